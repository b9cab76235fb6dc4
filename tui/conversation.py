"""Conversation files: /save writes a JSON list of {"role", "content"} messages atomically; /load reads one back,
bounded and checked (a file from anywhere: any size, any nesting)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.files import write_atomically

MAX_FILE_BYTES = 16 * 2**20
MAX_MESSAGES = 1000
ROLES = ("system", "user", "assistant")


class ConversationError(UserError):
    """A conversation file cannot be read or is not a saved conversation: one sentence naming it."""


def save_conversation(path: Path, messages: list[dict]) -> None:
    """Write the messages; a process killed meanwhile leaves the previous file whole (temp, fsync, rename)."""
    write_atomically(path, json.dumps(messages, ensure_ascii=False, indent=1).encode())


def read_conversation(path: Path) -> list[dict]:
    """The messages of a file /save wrote (at most MAX_MESSAGES, MAX_FILE_BYTES), as {"role", "content"} dicts."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConversationError(f"{path}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ConversationError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB, not a saved conversation")
        with open(path, "rb") as f:
            messages = json.loads(f.read(MAX_FILE_BYTES + 1).decode("utf-8"))
    except OSError as e:
        raise ConversationError(f"{path}: {e.strerror or e}") from None
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deeply
        raise ConversationError(f"{path}: not a saved conversation (not valid JSON)") from None
    if not isinstance(messages, list):
        raise ConversationError(f"{path}: not a saved conversation (a JSON list of role/content messages)")
    if len(messages) > MAX_MESSAGES:
        raise ConversationError(f"{path}: {len(messages)} messages, more than the {MAX_MESSAGES} a conversation "
                                "may load")
    for n, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ConversationError(f"{path}: message {n} is not a role ({', '.join(ROLES)}) with text content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
