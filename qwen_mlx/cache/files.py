"""Prompt-cache files: a model's per-layer caches, the token ids they hold and string metadata in one safetensors
file, written atomically and read as data only.

The file's "qwen_mlx" metadata is JSON: {"format", "version", "model" (model_fingerprint), "tokens", "metadata",
"layers": [{"kind", **meta_state}, ...]}; layer i's state arrays are the tensors "layers.{i}.{name}", named as the
cache kind's state_layout names them. No class is looked up by a name from the file: `kind` picks one of KINDS.
A hybrid model's linear-attention layers are "recurrent" (conv tail and float32 state; their snapshots are not
saved), its full-attention layers one of the KV kinds, each checked against the layer's type.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from qwen_mlx.cache.kv import KVCache, LayerCache, QuantizedKVCache, RotatingKVCache
from qwen_mlx.cache.recurrent import RecurrentCache
from qwen_mlx.cache.store import CacheError
from qwen_mlx.errors import UserError
from qwen_mlx.files import replacing

if TYPE_CHECKING:
    from qwen_mlx.models.config import ModelConfig
    from qwen_mlx.models.qwen3 import Model

_FORMAT = "qwen-mlx prompt cache"
_VERSION = 1
_FLOAT_DTYPES = ("F32", "F16", "BF16")  # what a "float" array of a state layout may be
KINDS = {cls.kind: cls for cls in (KVCache, QuantizedKVCache, RotatingKVCache, RecurrentCache)}


class CacheFileError(UserError):
    """A prompt-cache file that cannot be loaded; the message is one sentence naming the file."""


@dataclass(frozen=True)
class PromptCache:
    """What load_cache returns: the per-layer caches, the token ids they hold (may be empty), user metadata."""

    caches: list[LayerCache]
    tokens: list[int]
    metadata: dict[str, str]


def model_fingerprint(model: Model) -> str:
    """Identity of a loaded model for prompt-cache files: its config, its weight dtype and two trained norm
    vectors (the final norm and layer 0's input norm), so that two fine-tunes of one architecture differ too."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for w in (model.model.norm.weight, model.layers[0].input_layernorm.weight):
        h.update(str(w.dtype).encode())
        h.update(memoryview(w.astype(mx.float32)).tobytes())
    return h.hexdigest()[:32]


def save_cache(path: str | Path, caches: Sequence[LayerCache], *, model: Model, tokens: Sequence[int] = (),
               metadata: Mapping[str, str] | None = None) -> None:
    """Write the caches (one per layer), the token ids they hold (optional) and string metadata to a
    safetensors file, atomically: a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    cfg = model.config
    if len(caches) != cfg.num_hidden_layers:
        raise CacheError(f"{path}: {len(caches)} caches given for a model of {cfg.num_hidden_layers} layers")
    tokens = [int(t) for t in tokens]
    if tokens and any(len(tokens) != c.offset for c in caches):
        raise CacheError(f"{path}: {len(tokens)} token ids given for caches holding {caches[0].offset} tokens")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    arrays: dict[str, mx.array] = {}
    layers = []
    for i, cache in enumerate(caches):
        if type(cache) not in KINDS.values():
            raise TypeError(f"cannot save a {type(cache).__name__}")
        if isinstance(cache, RecurrentCache) != cfg.is_linear_layer(i):
            raise CacheError(f"{path}: layer {i} is {_layer_type(cfg, i)}, its cache a {type(cache).__name__}")
        names = type(cache).state_layout(cache.meta_state, cfg).arrays
        arrays.update({f"layers.{i}.{name}": a for name, a in zip(names, cache.state)})
        layers.append({"kind": cache.kind, **cache.meta_state})
    header = {"format": _FORMAT, "version": _VERSION, "model": model_fingerprint(model), "tokens": tokens,
              "metadata": meta, "layers": layers}
    # mx.save_safetensors appends ".safetensors" to a name without it: the temporary name ends with it.
    with replacing(path, suffix=".tmp.safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={"qwen_mlx": json.dumps(header)})


def load_cache(path: str | Path, *, model: Model) -> PromptCache:
    """Read a file written by save_cache for this model. Everything is checked before `mx.load` reads a byte of
    tensor data: the safetensors header (by the `safetensors` package's parser), the JSON metadata, the model
    identity, every layer's settings and every tensor's name, dtype and shape. Raises CacheFileError."""
    path = Path(path)
    cfg = model.config
    if not path.is_file():
        raise CacheFileError(f"{path}: no such prompt-cache file")
    header, tensors = _read_header(path)
    if header["model"] != model_fingerprint(model):
        raise CacheFileError(f"{path}: this prompt cache was made for another model or config, not this one")
    layers = header["layers"]
    if len(layers) != cfg.num_hidden_layers:
        raise CacheFileError(f"{path}: the file has {len(layers)} layers, the model {cfg.num_hidden_layers}")
    batch = {shape[0] if shape else 0 for _, shape in tensors.values()}
    if len(batch) > 1 or 0 in batch:
        raise CacheFileError(f"{path}: the tensors disagree on the batch size or have none")
    B = batch.pop() if batch else 1
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, info in enumerate(layers):
        expected.update(_check_layer(path, i, info, cfg, tensors, B))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CacheFileError(f"{path}: tensor {unexpected[0]} is not part of a prompt cache")
    float_dtypes = set()
    for name, (dtype, shape) in tensors.items():
        want_dtype, want_shape = expected[name]
        if (dtype not in _FLOAT_DTYPES if want_dtype == "float" else dtype != want_dtype) or shape != want_shape:
            raise CacheFileError(f"{path}: tensor {name} is {dtype} {list(shape)}, expected "
                                 f"{want_dtype} {list(want_shape)}")
        if want_dtype == "float":
            float_dtypes.add(dtype)
    if len(float_dtypes) > 1:
        raise CacheFileError(f"{path}: the tensors mix float dtypes {', '.join(sorted(float_dtypes))}")
    offsets = {info["offset"] for info in layers}
    if len(offsets) != 1:
        raise CacheFileError(f"{path}: the layers disagree on the number of tokens they hold")
    tokens = header["tokens"]
    if tokens and len(tokens) != offsets.pop():
        raise CacheFileError(f"{path}: the file lists {len(tokens)} token ids for a cache of another length")
    if any(t >= cfg.vocab_size for t in tokens):
        raise CacheFileError(f"{path}: a token id is outside the model's vocabulary")
    arrays = mx.load(str(path)) if tensors else {}
    mx.eval(list(arrays.values()))  # read now: the file may be replaced later
    caches = []
    for i, info in enumerate(layers):
        kind, meta_state = KINDS[info["kind"]], {k: v for k, v in info.items() if k != "kind"}
        names = kind.state_layout(meta_state, cfg).arrays
        state = [arrays[f"layers.{i}.{name}"] for name in names if f"layers.{i}.{name}" in arrays]
        caches.append(kind.from_state(state, meta_state))
    return PromptCache(caches, tokens, header["metadata"])


def _read_header(path: Path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get("qwen_mlx")
            tensors = {}
            for name in f.keys():
                piece = f.get_slice(name)
                tensors[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    except Exception as e:  # the Rust parser's errors: bad header, offsets, sizes, truncated file
        raise CacheFileError(f"{path}: not a valid safetensors file ({' '.join(str(e).split())})") from None
    try:
        header = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise CacheFileError(f"{path}: not a qwen-mlx prompt-cache file (no valid 'qwen_mlx' metadata)")
    if header.get("version") != _VERSION:
        raise CacheFileError(f"{path}: prompt-cache format version {header.get('version')!r}, this qwen-mlx "
                             f"reads version {_VERSION}")
    tokens, meta, layers = header.get("tokens"), header.get("metadata"), header.get("layers")
    if (not isinstance(header.get("model"), str) or not isinstance(layers, list)
            or not all(isinstance(x, dict) for x in layers)
            or not isinstance(tokens, list) or not all(_is_int(t) and t >= 0 for t in tokens)
            or not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise CacheFileError(f"{path}: the prompt-cache metadata is malformed")
    return header, tensors


def _layer_type(cfg: ModelConfig, i: int) -> str:
    return "linear attention" if cfg.is_linear_layer(i) else "full attention"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_layer(path: Path, i: int, info: dict, cfg: ModelConfig, tensors: dict, B: int) -> dict:
    """Validate one layer's settings (by its cache kind's state_layout) against the file's tensors; return
    {name: (dtype or "float", shape)} of the tensors the layer must have."""
    kind = info.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise CacheFileError(f"{path}: layer {i} has unknown cache kind {kind!r}")
    if (kind == RecurrentCache.kind) != cfg.is_linear_layer(i):
        raise CacheFileError(f"{path}: layer {i} holds a {kind} cache, but the model's layer {i} is "
                             f"{_layer_type(cfg, i)}")
    try:
        layout = KINDS[kind].state_layout({k: v for k, v in info.items() if k != "kind"}, cfg)
    except CacheError:
        raise CacheFileError(f"{path}: layer {i} has invalid {kind} cache settings") from None
    names = [f"layers.{i}.{name}" for name in layout.arrays]
    least, most = layout.tokens
    _, first_dims = next(iter(layout.arrays.values()))
    if least == 0 and (None not in first_dims or not any(n in tensors for n in names)):
        return {}  # nothing stored yet (a fixed-size state holds nothing at offset 0, and any tensor is unexpected)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CacheFileError(f"{path}: tensor {missing[0]} is missing")
    if None not in first_dims:  # a fixed-size state
        return {n: (dtype, (B, *dims)) for n, (dtype, dims) in zip(names, layout.arrays.values())}
    shape = tensors[names[0]][1]
    slots = shape[1 + first_dims.index(None)] if len(shape) == 1 + len(first_dims) else -1
    if not least <= slots <= most:
        raise CacheFileError(f"{path}: tensor {names[0]} holds {slots} tokens, the layer's settings need "
                             f"{least if least == most else f'{least} to {most}'}")
    return {n: (dtype, (B, *(slots if d is None else d for d in dims)))
            for n, (dtype, dims) in zip(names, layout.arrays.values())}
