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

The hybrid models (llama.cpp's qwen35, qwen35moe, qwen3next) hold values that llama.cpp's converter changed, undone
here (hybrid_value) into the model's values (models/qwen3_5.py):
  - ssm_a is -exp(A_log): A_log = log(-ssm_a); dt_bias is written as ssm_dt.bias;
  - ssm_conv1d is (channels, width), squeezed: the model's (channels, width, 1);
  - the zero-centred norms hold 1 + w, as the model does (the gated ssm_norm is a plain scale in both);
  - qwen35/qwen35moe with more value heads than key heads: the value heads are tiled ([v0 of every key head, v1 of
    every key head, ...]) rather than grouped by key head, in attn_qkv's v rows, attn_gate, ssm_beta, ssm_alpha,
    ssm_a, ssm_dt, ssm_conv1d's v channels and ssm_out's columns; they are grouped again;
  - qwen3next's in_proj_qkvz (q, k, v, z interleaved per key head) is written as attn_qkv ([q | k | v]) and
    attn_gate (z): interleaved again; ssm_ba is in_proj_ba as it is.
Which layers are linear comes from the tensors each block holds (full_attention_interval cannot say another order).
Blocks past block_count - nextn_predict_layers are the multi-token-prediction head, not imported.
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
from qwen_mlx.models.config import ARCHITECTURES, HYBRID_MODEL_TYPES, LAYER_TYPES
from qwen_mlx.weights.names import GGUF_UNUSED, gguf_layer, gguf_name

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

MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",  # llama.cpp architecture -> ours
               "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe", "qwen3next": "qwen3_next"}

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
    """A Qwen2/Qwen3/Qwen3-MoE or hybrid (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) GGUF file as a checkpoint by the
    model's tensor names and values (tensors read when loaded)."""
    path = Path(path)
    header = read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise GGUFError(f"{path}: architecture {arch!r} is not a Qwen model qwen-mlx runs "
                        f"({', '.join(MODEL_TYPES)})")
    get = _Metadata(path, arch, meta)
    n_blocks = get("block_count", int)
    nextn = get("nextn_predict_layers", int, 0) if MODEL_TYPES[arch] in HYBRID_MODEL_TYPES else 0
    if not 0 <= nextn < n_blocks:
        raise GGUFError(f"{path}: {arch}.nextn_predict_layers {nextn} leaves no layers of the {n_blocks} blocks")
    n_layers = n_blocks - nextn  # the blocks after them are the multi-token-prediction head
    infos: dict[str, TensorInfo] = {}  # by Hugging Face name
    layers = set()
    for name, info in header.tensors.items():
        if name in GGUF_UNUSED:
            continue
        layer = gguf_layer(name)
        if layer is not None:
            layers.add(layer)
            if layer >= n_layers:
                continue
        hf_name = gguf_name(name)
        if hf_name is None:
            raise GGUFError(f"{path}: tensor {name} is not part of a {arch} model")
        infos[hf_name] = info
    if layers != set(range(n_blocks)):
        raise GGUFError(f"{path}: {arch}.block_count is {n_blocks} but the file has tensors for layers "
                        f"{min(layers, default=0)}..{max(layers, default=-1)}")
    config = _config(path, arch, get, header.tensors, n_layers)
    if config["model_type"] in HYBRID_MODEL_TYPES:
        tensors = _hybrid_tensors(path, infos, config)
    else:
        tensors = {hf_name: (info.shape, lambda info=info: mx.array(load_tensor(path, info)))
                   for hf_name, info in infos.items()}
    files = _tokenizer_files(path, meta, config)
    return GGUFCheckpoint(config, tensors, files)


class _Metadata:
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


def _config(path: Path, arch: str, get: _Metadata, tensors: dict[str, TensorInfo], n_layers: int) -> dict:
    model_type = MODEL_TYPES[arch]
    meta = get.meta
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    hidden, heads = get("embedding_length", int), get("attention.head_count", int)
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
    if model_type in ("qwen3_moe", "qwen3_next"):
        cfg.update(num_experts=get("expert_count", int), num_experts_per_tok=get("expert_used_count", int),
                   moe_intermediate_size=get("expert_feed_forward_length", int),
                   # llama.cpp's qwen3moe graph always renormalizes the top-k weights, as Qwen3-MoE configs say
                   norm_topk_prob=get("expert_weights_norm", bool, True),
                   decoder_sparse_step=1, mlp_only_layers=dense)
    if model_type in HYBRID_MODEL_TYPES:
        cfg.update(_hybrid_config(path, get, tensors, n_layers, cfg, dense))
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


def _hybrid_config(path: Path, get: _Metadata, tensors: dict[str, TensorInfo], n_layers: int, cfg: dict,
                   dense: list[int]) -> dict:
    """The Gated DeltaNet and gated-attention keys of a qwen35 / qwen35moe / qwen3next file."""
    model_type = cfg["model_type"]
    layer_types = []
    for i in range(n_layers):
        linear, full = f"blk.{i}.ssm_out.weight" in tensors, f"blk.{i}.attn_q.weight" in tensors
        if linear == full:
            raise GGUFError(f"{path}: block {i} holds {'both' if linear else 'neither'} a linear-attention "
                            "(ssm_out) and a full-attention (attn_q) projection")
        layer_types.append(LAYER_TYPES[full])
    head_dim, rotary = cfg["head_dim"], get("rope.dimension_count", int)
    factor = rotary / head_dim if head_dim else 0.0
    if not 0 < rotary <= head_dim or int(head_dim * factor) != rotary:
        raise GGUFError(f"{path}: {get.arch}.rope.dimension_count {rotary} is not a share of the head dim {head_dim}")
    linear = {key: get(key, int) for key in ("ssm.group_count", "ssm.time_step_rank", "ssm.state_size",
                                              "ssm.inner_size", "ssm.conv_kernel")}
    for key, value in linear.items():
        if value <= 0:
            raise GGUFError(f"{path}: {get.arch}.{key} must be positive, got {value}")
    heads_k, heads_v, inner = linear["ssm.group_count"], linear["ssm.time_step_rank"], linear["ssm.inner_size"]
    if heads_v % heads_k or inner % heads_v:
        raise GGUFError(f"{path}: {get.arch}.ssm.time_step_rank {heads_v} (value heads) must be a multiple of "
                        f"ssm.group_count {heads_k} (key heads) and divide ssm.inner_size {inner}")
    out = {
        "layer_types": layer_types,
        "full_attention_interval": get("full_attention_interval", int, 4),  # what mlx-lm reads instead
        "linear_num_key_heads": heads_k,
        "linear_num_value_heads": heads_v,
        "linear_key_head_dim": linear["ssm.state_size"],
        "linear_value_head_dim": inner // heads_v,
        "linear_conv_kernel_dim": linear["ssm.conv_kernel"],
    }
    if model_type == "qwen3_next":  # mlx-lm's Qwen3-Next reads these at the top level, and needs every key
        out.update(partial_rotary_factor=factor, intermediate_size=cfg.get("intermediate_size", 0))
    else:  # mlx-lm's Qwen3.5 reads rope_parameters only
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"],
                                  "partial_rotary_factor": factor}
    if model_type in ("qwen3_5_moe", "qwen3_next"):
        if model_type == "qwen3_5_moe":
            if dense:
                raise GGUFError(f"{path}: block {dense[0]} has no router (ffn_gate_inp); every layer of a "
                                f"{get.arch} model is a mixture of experts")
            out.update(num_experts=get("expert_count", int), num_experts_per_tok=get("expert_used_count", int),
                       moe_intermediate_size=get("expert_feed_forward_length", int))
        out["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length", int)
    return out


def _hybrid_tensors(path: Path, infos: dict[str, TensorInfo], cfg: dict) -> dict:
    """The hybrid model's tensors (name -> (shape, load)) from the file's, llama.cpp's transforms undone."""
    Hk, Hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    Dk, Dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    tiled = cfg["model_type"] != "qwen3_next" and Hv != Hk  # llama.cpp's Qwen3.5 converter tiles value heads
    key_dim, value_dim, hidden = Hk * Dk, Hv * Dv, cfg["hidden_size"]
    width = cfg["linear_conv_kernel_dim"]
    # the shapes the metadata implies, as the file holds them
    shapes = {"in_proj_qkv.weight": (2 * key_dim + value_dim, hidden), "in_proj_z.weight": (value_dim, hidden),
              "in_proj_b.weight": (Hv, hidden), "in_proj_a.weight": (Hv, hidden),
              "in_proj_ba.weight": (2 * Hv, hidden), "conv1d.weight": (2 * key_dim + value_dim, width),
              "A_log": (Hv,), "dt_bias": (Hv,),
              "norm.weight": (Dv,), "out_proj.weight": (hidden, value_dim)}

    def grouped(x: np.ndarray, axis: int, d: int) -> np.ndarray:
        """Value heads along `axis` (heads x d) from llama.cpp's tiled order (Hv / Hk, Hk, d) to grouped (Hk, ...)."""
        if not tiled:
            return x
        shape = x.shape
        x = x.reshape(*shape[:axis], Hv // Hk, Hk, d, *shape[axis + 1:])
        return np.swapaxes(x, axis, axis + 1).reshape(shape)

    def value(name: str, x: np.ndarray, gguf: str) -> np.ndarray:
        leaf = name.rpartition(".linear_attn.")[2]
        if leaf == "in_proj_qkv.weight":
            return np.concatenate([x[:2 * key_dim], grouped(x[2 * key_dim:], 0, Dv)])
        if leaf == "in_proj_z.weight":
            return grouped(x, 0, Dv)
        if leaf in ("in_proj_b.weight", "in_proj_a.weight", "dt_bias"):
            return grouped(x, 0, 1)
        if leaf == "A_log":
            if not (x < 0).all():
                raise GGUFError(f"{path}: tensor {gguf} must be negative (llama.cpp stores -exp(A_log))")
            return grouped(np.log(-x), 0, 1)
        if leaf == "conv1d.weight":
            x = np.concatenate([x[:2 * key_dim], grouped(x[2 * key_dim:], 0, Dv)])
            return x[:, :, None]  # (C, width) -> (C, width, 1)
        if leaf == "out_proj.weight":
            return grouped(x, 1, Dv)
        return x

    out = {}
    for name, info in infos.items():
        leaf = name.rpartition(".linear_attn.")[2] if ".linear_attn." in name else None
        expected = shapes.get(leaf)
        if expected is not None and info.shape != expected:
            raise GGUFError(f"{path}: tensor {info.name} has shape {info.shape}; the metadata makes it {expected}")
        shape = (*info.shape, 1) if leaf == "conv1d.weight" else info.shape
        out[name] = (shape, lambda n=name, i=info: mx.array(value(n, load_tensor(path, i), i.name)))
    if cfg["model_type"] == "qwen3_next":
        _interleave_qkvz(path, infos, out, Hk)
    return out


def _interleave_qkvz(path: Path, infos: dict[str, TensorInfo], out: dict, Hk: int) -> None:
    """qwen3next: attn_qkv ([q | k | v], all heads each) and attn_gate (z) -> in_proj_qkvz, [q, k, v, z] for each
    key head in turn (the order Qwen3-Next's checkpoints and the model use), in place."""
    for qkv_name in [n for n in out if n.endswith(".linear_attn.in_proj_qkv.weight")]:
        z_name = qkv_name.replace(".in_proj_qkv.", ".in_proj_z.")
        if z_name not in out:
            raise GGUFError(f"{path}: tensor {infos[qkv_name].name.replace('attn_qkv', 'attn_gate')} is missing")
        (qkv_shape, qkv), (z_shape, z) = out.pop(qkv_name), out.pop(z_name)
        value_rows, hidden = z_shape
        key_rows = (qkv_shape[0] - value_rows) // 2

        def join(qkv=qkv, z=z, k=key_rows, hidden=hidden) -> mx.array:
            w, gate = qkv(), z()
            parts = (w[:k], w[k:2 * k], w[2 * k:], gate)  # q, k, v, z: each (heads * dim, hidden)
            return mx.concatenate([p.reshape(Hk, -1, p.shape[-1]) for p in parts], axis=1).reshape(-1, hidden)

        out[qkv_name.replace(".in_proj_qkv.", ".in_proj_qkvz.")] = ((2 * key_rows + 2 * value_rows, hidden), join)
    for z_name in [n for n in out if n.endswith(".linear_attn.in_proj_z.weight")]:
        raise GGUFError(f"{path}: tensor {infos[z_name].name.replace('attn_gate', 'attn_qkv')} is missing")


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
