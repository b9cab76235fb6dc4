"""Read a Qwen GGUF file (llama.cpp's format) as a Hugging Face-named checkpoint: config, tensors, tokenizer.

GGUF files are untrusted input, and neither MLX's reader nor the `gguf` package's bounds what a header claims
(MLX 0.32.4 crashes on absurd counts; `gguf.GGUFReader` allocates and loops over whatever a count says). So the
header is parsed here, in Python, with every count and length checked against the bytes that remain before
anything is allocated for it; tensors must have 1 to 4 positive dimensions, a known ggml type, an aligned offset
and data inside the file, without overlapping. Only then are the tensors read, one at a time through a read-only
memory map, and dequantized with `gguf.quants.dequantize` (llama.cpp's reference formulas).

`gguf.GGUFReader` is not used to read: it builds numpy views element by element and takes ~20 s on a real Qwen
vocabulary (151,936 tokens, 151,387 merges); this parser reads the same header in well under a second. The tests
check that both read the same metadata and tensor table.

llama.cpp writes Qwen2/Qwen3 Q and K projections unpermuted (its Qwen models use NeoX-style RoPE, the Hugging Face
layout; only the Llama converter permutes), so no un-permutation is needed.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.errors import UserError
from qwen_mlx.models.config import ARCHITECTURES
from qwen_mlx.weights.names import GGUF_UNUSED, gguf_name

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

MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}  # llama.cpp architecture -> ours

# Qwen2's pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer), the same for Qwen2, 2.5 and 3.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


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


@dataclass
class GGUFCheckpoint:
    """What convert needs: a Hugging Face config.json, the tensors by HF name with lazy loaders, and files."""

    config: dict
    tensors: dict[str, tuple[tuple[int, ...], Callable[[], mx.array]]]
    files: dict[str, bytes]


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


# --- Qwen model, config and tokenizer -------------------------------------------------------------------------

def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """A Qwen2/Qwen3/Qwen3-MoE GGUF file as a Hugging Face-named checkpoint (tensors read when loaded)."""
    path = Path(path)
    header = read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise GGUFError(f"{path}: architecture {arch!r} is not a Qwen model qwen-mlx runs "
                        f"({', '.join(MODEL_TYPES)})")
    tensors = {}
    layers = set()
    for name, info in header.tensors.items():
        if name in GGUF_UNUSED:
            continue
        hf_name = gguf_name(name)
        if hf_name is None:
            raise GGUFError(f"{path}: tensor {name} is not part of a {arch} model")
        if name.startswith("blk."):
            layers.add(int(name.split(".")[1]))
        tensors[hf_name] = (info.shape, lambda info=info: mx.array(load_tensor(path, info)))
    config = _config(path, arch, meta, header.tensors, layers)
    files = _tokenizer_files(path, meta, config)
    return GGUFCheckpoint(config, tensors, files)


def _config(path: Path, arch: str, meta: dict, tensors: dict[str, TensorInfo], layers: set[int]) -> dict:
    def get(key: str, kind: type, default=None):
        full = f"{arch}.{key}"
        value = meta.get(full, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer list that is the same for every layer
        if value is None:
            raise GGUFError(f"{path}: metadata key {full} is missing")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise GGUFError(f"{path}: metadata key {full} must be {kind.__name__}, got {value!r}")
        return value

    model_type = MODEL_TYPES[arch]
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    hidden, heads = get("embedding_length", int), get("attention.head_count", int)
    n_layers = get("block_count", int)
    if layers != set(range(n_layers)):
        raise GGUFError(f"{path}: {arch}.block_count is {n_layers} but the file has tensors for layers "
                        f"{min(layers, default=0)}..{max(layers, default=-1)}")
    vocab = tensors["token_embd.weight"].shape[0]
    cfg = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", int, heads),
        "head_dim": get("attention.key_length", int, hidden // heads if heads else 0),
        "vocab_size": vocab,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float, 1e-6),
        "rope_theta": get("rope.freq_base", float, 10000.0),
        "max_position_embeddings": get("context_length", int, 32768),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16" if all(t.ggml_type in ("BF16", "F32") for t in tensors.values()) else "float16",
    }
    dense = [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors]
    if dense:
        cfg["intermediate_size"] = get("feed_forward_length", int)
    if model_type == "qwen3_moe":
        cfg.update(num_experts=get("expert_count", int), num_experts_per_tok=get("expert_used_count", int),
                   moe_intermediate_size=get("expert_feed_forward_length", int),
                   # llama.cpp's qwen3moe graph always renormalizes the top-k weights, as Qwen3-MoE configs say
                   norm_topk_prob=get("expert_weights_norm", bool, True),
                   decoder_sparse_step=1, mlp_only_layers=dense)
    if meta.get(f"{arch}.rope.scaling.type") == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": get("rope.scaling.factor", float),
                               "original_max_position_embeddings": get("rope.scaling.original_context_length", int)}
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            if not isinstance(value, int) or not 0 <= value < vocab:
                raise GGUFError(f"{path}: tokenizer.ggml.{gguf_key} {value!r} is not a token id below {vocab}")
            cfg[key] = value
    return cfg


def _tokenizer_files(path: Path, meta: dict, config: dict) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json rebuilt from the GGUF vocabulary (none if the file has none)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return {}
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "qwen2")
    if model != "gpt2" or pre != "qwen2":
        raise GGUFError(f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not Qwen's (gpt2, qwen2)")
    types = meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    merges = meta.get("tokenizer.ggml.merges", [])
    if not (isinstance(tokens, list) and isinstance(types, list) and isinstance(merges, list)) \
            or len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens + merges):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens, token_type and merges must be lists of one length, "
                        "of strings")
    if len(tokens) > config["vocab_size"]:
        raise GGUFError(f"{path}: {len(tokens)} tokens but only {config['vocab_size']} embedding rows")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise GGUFError(f"{path}: tokenizer.ggml.merges has an entry that is not two tokens")

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _NORMAL}
    added = [(i, t, kind == _CONTROL) for i, (t, kind) in enumerate(zip(tokens, types))
             if kind in (_CONTROL, _USER_DEFINED)]
    try:
        tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # the library names the merge whose tokens are not in the vocabulary
        raise GGUFError(f"{path}: the GGUF vocabulary does not make a BPE tokenizer ({' '.join(str(e).split())})") \
            from None
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for _, t, special in added])
    for i, t, _ in added:  # the library numbers added tokens after the vocabulary: they must land on their ids
        if tok.token_to_id(t) != i:
            raise GGUFError(f"{path}: added token {t!r} (id {i}) does not follow the regular vocabulary")

    def token(key: str) -> str | None:
        i = config.get(key)
        return tokens[i] if i is not None and i < len(tokens) else None

    tokenizer_config = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": special} for i, t, special in added},
        "bos_token": None,
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": token("eos_token_id"),
        "errors": "replace",
        "model_max_length": config["max_position_embeddings"],
        "pad_token": token("pad_token_id"),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if tokenizer_config["chat_template"] is None:
        del tokenizer_config["chat_template"]
    return {"tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": (json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n").encode()}
