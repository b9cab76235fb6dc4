"""Reading a checkpoint's files, which come from a download: only regular files, only inside the checkpoint
directory, and JSON and template files only up to a size bound (a link to /dev/zero or a FIFO named config.json
must fail at once, not fill memory or hang).

A file may resolve outside the directory only into the Hugging Face cache's own blob store: a snapshot
(`models--org--name/snapshots/REV/`) holds links into `models--org--name/blobs/`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from qwen_mlx.errors import UserError

MAX_JSON_BYTES = 64 * 2**20  # tokenizer.json of a 250k vocabulary is ~30 MB; configs and templates far less


class UntrustedFileError(UserError):
    """A checkpoint file is not a regular file, lies outside the checkpoint, is too large or is not valid JSON."""


def checked_file(path: Path, root: Path) -> Path:
    """The real path of `path` once it is known to be a regular file inside `root` (or its hub blob store)."""
    try:
        real, home = path.resolve(), root.resolve()
        info = os.stat(real)
    except FileNotFoundError:
        raise UntrustedFileError(f"{path}: file not found") from None
    except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13), permissions
        raise UntrustedFileError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    homes = [home, home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [home]
    if not any(real.is_relative_to(h) for h in homes):
        raise UntrustedFileError(f"{path}: links outside the checkpoint directory (to {real}); refusing to read it")
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedFileError(f"{path}: not a regular file")
    return real


def read_bytes(path: Path, root: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """The file's bytes, refused past `limit` (see checked_file for which files are read at all)."""
    real = checked_file(path, root)
    with open(real, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UntrustedFileError(f"{path}: larger than {limit / 2**20:g} MiB, too large for this kind of file")
    return data


def read_text(path: Path, root: Path, limit: int = MAX_JSON_BYTES) -> str:
    try:
        return read_bytes(path, root, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UntrustedFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: Path, root: Path, limit: int = MAX_JSON_BYTES):
    """The parsed JSON document (any type: the caller checks its shape)."""
    try:
        return json.loads(read_text(path, root, limit))
    except json.JSONDecodeError as e:
        raise UntrustedFileError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UntrustedFileError(f"{path}: not valid JSON (nested too deeply)") from None
