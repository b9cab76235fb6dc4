"""The GGUF file itself (llama.cpp's format): a bounded parse of its header, its tensors dequantized one at a time.

GGUF files are untrusted input, and neither MLX's reader nor the `gguf` package's bounds what a header claims
(MLX 0.32.4 crashes on absurd counts; `gguf.GGUFReader` allocates and loops over whatever a count says). So the
header is parsed here, in Python, with every count and length checked against the bytes that remain before
anything is allocated for it; tensors must have 1 to 4 positive dimensions, a known ggml type, an aligned offset
and data inside the file, without overlapping. Only then are the tensors read, one at a time through a read-only
memory map, and dequantized with `gguf.quants.dequantize` (llama.cpp's reference formulas).

`gguf.GGUFReader` is not used to read: it builds numpy views element by element and takes ~20 s on a real Qwen
vocabulary (151,936 tokens, 151,387 merges); this parser reads the same header in well under a second. The tests
check that both read the same metadata and tensor table.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_mlx.errors import UserError

# gguf value types: id -> (struct format, size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_DEPTH = 2  # an array of arrays at most; llama.cpp writes none
DEFAULT_ALIGNMENT = 32

# Types we dequantize (gguf.quants has the reference formulas); the others a Qwen GGUF does not use.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")


class GGUFError(UserError):
    """A GGUF file that is malformed, hostile or not a Qwen model; one sentence naming the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (llama.cpp's ne reversed)
    ggml_type: str  # F16, Q4_K, ...
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict[str, object]
    tensors: dict[str, TensorInfo]
    data_start: int


# --- the bounded header parse ---------------------------------------------------------------------------------

class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: not a valid GGUF file ({what})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} runs past the end of the file")
        self.pos += n
        return self.buf[self.pos - n:self.pos]  # a copy: nothing keeps the map open

    def scalar(self, fmt: str, size: int, what: str):
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        raw = self.take(n, f"{what} ({n} bytes)")
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def bound(self, count: int, min_size: int, what: str) -> None:
        if count * min_size > self.size - self.pos:
            raise self.fail(f"{what} {count} needs more bytes than the file has left")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            value = self.scalar(*_SCALARS[vtype], what)
            # float32 metadata (rms eps 1e-6): the shortest decimal that is the same float32, not 9.99999997e-07
            return float(str(np.float32(value))) if vtype == 6 else value
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= _MAX_DEPTH:
            raise self.fail(f"{what} nests arrays more than {_MAX_DEPTH} deep")
        itype = self.u32(f"{what} item type")
        count = self.u64(f"{what} length")
        if itype in _NUMPY:
            size = _SCALARS[itype][1]
            self.bound(count, size, f"{what} length")
            values = np.frombuffer(self.take(count * size, what), dtype=_NUMPY[itype])
            return values.astype(bool).tolist() if itype == 7 else values.tolist()
        if itype == _STRING:
            self.bound(count, 8, f"{what} length")
            return [self.string(f"{what}[{i}]") for i in range(count)]
        if itype == _ARRAY:
            self.bound(count, 12, f"{what} length")
            return [self.value(_ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.fail(f"{what} has unknown item type {itype}")


def read_header(path: str | Path) -> Header:
    """Parse and check a GGUF header without trusting any count or length in it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise GGUFError(f"{path}: not a valid GGUF file ({size} bytes, shorter than a GGUF header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path), GGML_QUANT_SIZES, GGMLQuantizationType)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None


def _parse(c: _Cursor, quant_sizes, ggml_types) -> Header:
    if bytes(c.take(4, "magic")) != b"GGUF":
        raise c.fail("it does not start with the GGUF magic bytes")
    version = c.u32("version")
    if version not in (2, 3):
        raise c.fail(f"version {version}; qwen-mlx reads GGUF versions 2 and 3")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    c.bound(n_kv, 8 + 1 + 4 + 1, "metadata count")  # the smallest entry: 1-byte key, type, 1-byte value
    c.bound(n_tensors, 8 + 1 + 4 + 8 + 4 + 8, "tensor count")  # 1-byte name, 1 dim, type, offset
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        if key in metadata:
            raise c.fail(f"metadata key {key} appears twice")
        metadata[key] = c.value(c.u32(f"type of {key}"), key)

    infos = []
    names = set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}")
        if not name or name in names:
            raise c.fail(f"tensor {i} has {'an empty' if not name else 'a repeated'} name {name!r}")
        names.add(name)
        n_dims = c.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= 4:
            raise c.fail(f"tensor {name} has {n_dims} dimensions (1 to 4 allowed)")
        dims = [c.u64(f"dimensions of {name}") for _ in range(n_dims)]
        raw_type = c.u32(f"type of {name}")
        offset = c.u64(f"offset of {name}")
        try:
            ggml_type = ggml_types(raw_type)
        except ValueError:
            raise c.fail(f"tensor {name} has unknown ggml type {raw_type}") from None
        if ggml_type.name not in SUPPORTED_TYPES:
            raise GGUFError(f"{c.path}: tensor {name} is {ggml_type.name}, which qwen-mlx does not import "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
        if any(d <= 0 for d in dims):
            raise c.fail(f"tensor {name} has a zero dimension {dims}")
        block, type_size = quant_sizes[ggml_type]
        if dims[0] % block:
            raise c.fail(f"tensor {name}: its rows ({dims[0]}) are not whole {ggml_type.name} blocks of {block}")
        n_elements = int(np.prod(np.array(dims, dtype=object)))  # Python ints: no overflow
        infos.append((name, tuple(reversed(dims)), ggml_type.name, offset, n_elements // block * type_size))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    end_of_previous, previous = data_start, None
    for name, shape, ggml_type, offset, nbytes in sorted(infos, key=lambda t: t[3]):
        if offset % alignment:
            raise c.fail(f"tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}")
        start = data_start + offset
        if nbytes > c.size - start:
            raise c.fail(f"tensor {name} ({nbytes} bytes at offset {offset}) runs past the end of the file")
        if start < end_of_previous:
            raise c.fail(f"tensor {name} overlaps tensor {previous}")
        end_of_previous, previous = start + nbytes, name
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
    return Header(version, metadata, {name: tensors[name] for name, *_ in infos}, data_start)


def load_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor, dequantized to float32, in numpy (Hugging Face) order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset).copy()
    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    values = dequantize(raw.reshape(rows, -1), GGMLQuantizationType[info.ggml_type])
    return np.asarray(values, dtype=np.float32).reshape(info.shape)


class Metadata:
    """get(key, kind, default): the value of `{arch}.{key}`, checked (a per-layer list that is the same for every
    layer reads as that value); a missing key without a default is an error."""

    def __init__(self, path: Path, arch: str, meta: dict):
        self.path, self.arch, self.meta = path, arch, meta

    def __call__(self, key: str, kind: type, default=None):
        full = f"{self.arch}.{key}"
        value = self.meta.get(full, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]
        if value is None:
            raise GGUFError(f"{self.path}: metadata key {full} is missing")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise GGUFError(f"{self.path}: metadata key {full} must be {kind.__name__}, got {value!r}")
        return value
