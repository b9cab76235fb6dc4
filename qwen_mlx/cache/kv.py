"""Per-layer KV caches. A cache owns its position (`offset`), its storage and the attention over it.

    KVCache            every token, float; grows in steps of 256 tokens
    QuantizedKVCache   every token, K/V group-quantized (mx.quantize); attention by quantized matmuls
    RotatingKVCache    fixed memory: the first `keep` tokens plus a ring of the most recent ones; float or quantized
    make_cache         one cache per layer, the kind chosen from the arguments
    save_cache / load_cache   a prompt-cache file: safetensors + JSON metadata, data only, validated on load

Keys are cached after RoPE, so a cached key never moves: `offset` is the absolute position of the next token
(the RoPE offset of the next step) and keeps increasing when a ring wraps.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from qwen_mlx.errors import UserError
from qwen_mlx.files import replacing
from qwen_mlx.models.config import ModelConfig

if TYPE_CHECKING:
    from qwen_mlx.models.qwen3 import Model

STEP = 256  # storage grows by this many tokens at a time
BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports
GROUP_SIZES = (32, 64, 128)


class CacheError(UserError, ValueError):
    """Cache settings that cannot work (the message names the setting and its CLI flag)."""


class CacheFileError(UserError):
    """A prompt-cache file that cannot be loaded; the message is one sentence naming the file."""


# --------------------------------------------------------------------------------------------------- storage


class _Store:
    """The K and V of one layer, tokens along axis 2. Float: [K, V], each (B, n_kv, S, head_dim). Quantized:
    [K, K scales, K biases, V, V scales, V biases] as mx.quantize returns them (packed uint32 (B, n_kv, S,
    head_dim * bits / 32), scales and biases (B, n_kv, S, head_dim / group_size)). Grows in steps up to a limit."""

    def __init__(self, bits: int | None, group_size: int):
        self.bits, self.group_size = bits, group_size
        self.arrays: list[mx.array] | None = None

    @property
    def size(self) -> int:
        return 0 if self.arrays is None else self.arrays[0].shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.arrays is None else sum(a.nbytes for a in self.arrays)

    def encode(self, k: mx.array, v: mx.array) -> list[mx.array]:
        if self.bits is None:
            return [k, v]
        if k.shape[-1] % self.group_size:
            raise CacheError(f"KV group size {self.group_size} (--kv-group-size) does not divide the model's "
                             f"head_dim {k.shape[-1]}")
        return [*mx.quantize(k, group_size=self.group_size, bits=self.bits),
                *mx.quantize(v, group_size=self.group_size, bits=self.bits)]

    def reserve(self, n: int, like: list[mx.array], limit: int | None = None) -> None:
        """Room for slots [0, n): grow to the next multiple of STEP (at most `limit`), keeping what is stored."""
        if n <= self.size:
            return
        capacity = -(-n // STEP) * STEP
        capacity = capacity if limit is None else min(capacity, limit)
        new = [mx.zeros((*a.shape[:2], capacity, a.shape[3]), a.dtype) for a in like]
        if self.arrays is not None:
            for dst, src in zip(new, self.arrays):
                dst[..., : src.shape[2], :] = src
        self.arrays = new

    def write(self, slot: int, parts: list[mx.array], start: int = 0, stop: int | None = None) -> None:
        """Store tokens start..stop of `parts` (encoded) at slots slot, slot + 1, ..."""
        stop = parts[0].shape[2] if stop is None else stop
        for dst, src in zip(self.arrays, parts):
            dst[..., slot : slot + stop - start, :] = src[..., start:stop, :]

    def view(self, n: int) -> list[mx.array]:
        return [a[..., :n, :] for a in self.arrays]

    def attend(self, q: mx.array, stored: list[mx.array], scale: float, mask: mx.array | None) -> mx.array:
        if self.bits is None:
            return mx.fast.scaled_dot_product_attention(q, stored[0], stored[1], scale=scale, mask=mask)
        return quantized_attention(q, stored, scale, mask, group_size=self.group_size, bits=self.bits)


def quantized_attention(q: mx.array, stored: list[mx.array], scale: float, mask: mx.array | None, *,
                        group_size: int, bits: int) -> mx.array:
    """softmax(scale * q K^T, masked) V with K and V group-quantized, by two quantized matmuls.

    q (B, H, L, D); stored = [K, K scales, K biases, V, V scales, V biases] with S tokens; mask (L, S) bool
    (True = attend) or None. GQA without repeating K/V: the n_rep = H / n_kv query heads of each KV head are
    folded into the rows, (B, n_kv, n_rep * L, D) against K/V (B, n_kv, S, ·). Not broadcasting K/V over n_rep
    matters: MLX's CPU quantized matmul would copy them (n_rep x the cache per layer); it also copies a K/V that
    is not contiguous, so callers pass whole storage arrays and mask the unused slots. Scores are softmaxed in
    float32.
    """
    B, H, L, D = q.shape
    n_kv = stored[0].shape[1]
    n_rep = H // n_kv
    q = (q * scale).reshape(B, n_kv, n_rep * L, D)  # head h uses KV head h // n_rep
    scores = mx.quantized_matmul(q, *stored[:3], transpose=True, group_size=group_size, bits=bits)
    scores = scores.astype(mx.float32)  # (B, n_kv, n_rep * L, S)
    if mask is not None:
        S = scores.shape[-1]
        scores = mx.where(mask, scores.reshape(B, n_kv, n_rep, L, S), -math.inf).reshape(B, n_kv, n_rep * L, S)
    p = mx.softmax(scores, axis=-1).astype(q.dtype)
    out = mx.quantized_matmul(p, *stored[3:], transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, H, L, D)  # (B, n_kv, n_rep * L, D) -> heads back in order


def _check_quantization(bits: int | None, group_size: int) -> None:
    if bits is not None and bits not in BITS:
        raise CacheError(f"KV cache bits (--kv-bits) must be one of {', '.join(map(str, BITS))}: got {bits}")
    if group_size not in GROUP_SIZES:
        raise CacheError(f"KV group size (--kv-group-size) must be one of "
                         f"{', '.join(map(str, GROUP_SIZES))}: got {group_size}")


# ---------------------------------------------------------------------------------------------- growing caches


class _StoredCache:
    """What the caches share: a position (`offset`) and a _Store."""

    _store: _Store
    offset: int

    def trim(self, n: int) -> int:
        """Forget the last n tokens (n is clipped to what is held); returns how many were removed. Exact."""
        n = max(0, min(n, self.offset))
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    @property
    def state(self) -> list[mx.array]:
        """The arrays that hold what the cache has seen (what to evaluate after a prefill chunk)."""
        return self._store.arrays or []


class KVCache(_StoredCache):
    """Keys and values of every token seen, float, preallocated in steps of 256 tokens and returned as views."""

    def __init__(self):
        self._store = _Store(None, 0)
        self.offset = 0

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Store keys, values (B, n_kv, L, head_dim) without attending (e.g. a context built directly)."""
        end = self.offset + keys.shape[2]
        self._store.reserve(end, [keys, values])
        self._store.write(self.offset, [keys, values])
        self.offset = end

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys, values (B, n_kv, L, head_dim); return all held keys and values (B, n_kv, offset, ·)."""
        self.append(keys, values)
        k, v = self._store.view(self.offset)
        return k, v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        keys, values = self.update_and_fetch(k, v)
        # "causal" is bottom-right aligned: query i (position offset + i) sees keys 0 .. offset + i.
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask="causal")



class QuantizedKVCache(_StoredCache):
    """Every token's K and V group-quantized with mx.quantize (`bits` per value plus a float scale and bias per
    `group_size` values); attention runs on the quantized data (quantized_attention). Grows in steps of 256.
    A step's own keys are quantized before it attends to them: every query reads exactly what is stored."""

    def __init__(self, bits: int = 8, group_size: int = 64):
        _check_quantization(bits, group_size)
        self.bits, self.group_size = bits, group_size
        self._store = _Store(bits, group_size)
        self.offset = 0

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Quantize and store keys, values (B, n_kv, L, head_dim) without attending."""
        parts = self._store.encode(keys, values)
        self._store.reserve(self.offset + keys.shape[2], parts)
        self._store.write(self.offset, parts)
        self.offset += keys.shape[2]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        start, L = self.offset, k.shape[2]
        self.append(k, v)
        # Over the whole storage (a slice of it would be copied, see quantized_attention): query i (position
        # start + i) sees slots 0 .. start + i, which also hides the slots not written yet.
        stored = self._store.arrays
        mask = None
        if self.offset < stored[0].shape[2] or L > 1:
            mask = mx.arange(stored[0].shape[2])[None] <= mx.arange(start, start + L)[:, None]
        return self._store.attend(q, stored, scale, mask)



# --------------------------------------------------------------------------------------------- rotating cache


class RotatingKVCache(_StoredCache):
    """Fixed memory: the first `keep` tokens are pinned, the others live in a ring; float, or quantized when
    `bits` is given (the quantized attention of QuantizedKVCache).

    Window (what every query attends to, for single-token and multi-token steps alike): the query at absolute
    position t sees exactly the keys at positions j with

        j <= t   and   (j < keep   or   j > t - (max_size - keep))

    i.e. the `keep` pinned tokens plus the max_size - keep most recent tokens, itself included: a sliding window
    of max_size tokens whose first `keep` places are pinned; at most max_size keys. A multi-token step (chunked
    prefill longer than the window, a turn appended to a full cache) gives each of its queries its own window,
    pinned tokens included; a step longer than the ring stores only its last tokens.

    Storage: `keep` pinned slots plus a ring of max_size - keep + slack slots (capacity = max_size + slack
    tokens); the token at position p >= keep lives in slot keep + (p - keep) % ring. It grows in steps of 256
    up to the capacity; from then on `nbytes` is constant. The `slack` extra slots are never attended to;
    they are the history that makes `trim` exact after the ring has wrapped.

    trim(n) guarantee: trim removes the last n tokens exactly (the cache is then indistinguishable, for every
    later step, from one that never saw them) as long as n <= `trimmable`. `trimmable` is `offset` until the
    ring first evicts a token, and slack + 1 in steady state (less right after an earlier trim, until as many
    new tokens have been written). trim(n) with n > trimmable removes only `trimmable` tokens and returns that
    number: the tokens older than the window that the trimmed ones evicted are gone, so re-prefill from the
    text instead.
    """

    def __init__(self, max_size: int, keep: int = 4, *, slack: int | None = None, bits: int | None = None,
                 group_size: int = 64):
        if slack is None:
            slack = default_slack(max_size)
        if max_size < 1 or keep < 0 or keep >= max_size:
            raise CacheError(f"the KV window (--max-kv-size, {max_size}) must be larger than the number of "
                             f"pinned tokens (--keep, {keep}), which cannot be negative")
        if slack < 0:
            raise CacheError(f"the rotating cache's slack must not be negative: got {slack}")
        _check_quantization(bits, group_size)
        self.max_size, self.keep, self.slack = max_size, keep, slack
        self.bits, self.group_size = bits, group_size
        self._store = _Store(bits, group_size)
        self.offset = 0
        self._lo = keep  # oldest non-pinned position still held; held: [max(_lo, keep), offset)
        self._used = 0  # slots ever written (the prefix of the storage that holds data)

    @property
    def capacity(self) -> int:
        return self.max_size + self.slack

    @property
    def _ring(self) -> int:
        return self.capacity - self.keep

    @property
    def trimmable(self) -> int:
        """The largest n for which trim(n) is exact (see the class docstring)."""
        if self._lo <= self.keep:  # nothing evicted yet
            return self.offset
        return max(0, self.offset - self._lo - (self.max_size - self.keep) + 1)

    def trim(self, n: int) -> int:
        """Forget the last min(n, trimmable) tokens exactly; returns how many were removed."""
        n = max(0, min(n, self.trimmable))
        self.offset -= n
        return n

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        start, L = self.offset, k.shape[2]
        parts = self._store.encode(k, v)
        q_pos = mx.arange(start, start + L)
        if L <= self.slack + 1:
            # The step's own writes only overwrite tokens that none of its queries may see: write, then attend
            # over the storage (decode takes this path).
            self._write(parts, start)
            stored, k_pos = self._store.view(self._used), self._slot_positions()
        else:
            # A longer step would overwrite keys its first queries still need: attend over what is held plus the
            # new tokens, then store only the new tokens that stay.
            held = self._store.view(self._used) if self._used else [p[..., :0, :] for p in parts]
            stored = [mx.concatenate([h, p], axis=2) for h, p in zip(held, parts)]
            k_pos = mx.concatenate([self._slot_positions(), q_pos])
            self._write(parts, start)
        t, j = q_pos[:, None], k_pos[None]
        mask = (j >= 0) & (j <= t) & ((j < self.keep) | (j > t - (self.max_size - self.keep)))  # (L, S)
        return self._store.attend(q, stored, scale, mask)

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Store keys, values (B, n_kv, L, head_dim) without attending: the tokens that stay in the window."""
        self._write(self._store.encode(keys, values), self.offset)

    def _slot_positions(self) -> mx.array:
        """The absolute position held in each of the first `_used` slots, -1 where a slot holds nothing valid."""
        s = mx.arange(self._used)
        keep, ring, offset = self.keep, self._ring, self.offset
        pinned = mx.where(s < offset, s, -1)
        newest_slot = keep + (offset - 1 - keep) % ring  # slot of the newest ring token (if any)
        p = offset - 1 - (newest_slot - s + ring) % ring  # newest position < offset that maps to slot s
        ring_pos = mx.where(p >= max(self._lo, keep), p, -1)
        return mx.where(s < keep, pinned, ring_pos)

    def _write(self, parts: list[mx.array], start: int) -> None:
        """Store the tokens at positions start .. start + L - 1: pinned ones in their slots, the others in the
        ring, skipping those the step's own later tokens would overwrite."""
        L = parts[0].shape[2]
        end, keep, ring = start + L, self.keep, self._ring
        pieces = []  # (slot, first token of the step, end token of the step)
        if start < keep:
            pieces.append((start, 0, min(end, keep) - start))
        p = max(start, keep, end - ring)
        while p < end:
            slot = keep + (p - keep) % ring
            n = min(end - p, keep + ring - slot)
            pieces.append((slot, p - start, p - start + n))
            p += n
        need = max((slot + b - a for slot, a, b in pieces), default=0)
        self._store.reserve(need, parts, limit=self.capacity)
        for slot, a, b in pieces:
            self._store.write(slot, parts, a, b)
        self._used = max(self._used, need)
        self.offset = end
        self._lo = max(self._lo, end - ring, keep)


def default_slack(max_size: int) -> int:
    """Extra ring slots kept beyond the window, for exact trims after wrapping: max_size / 8, at most 256."""
    return min(256, max_size // 8)


LayerCache = KVCache | QuantizedKVCache | RotatingKVCache


def make_cache(cfg: ModelConfig, *, max_size: int | None = None, keep: int = 4, slack: int | None = None,
               bits: int | None = None, group_size: int | None = None) -> list[LayerCache]:
    """One cache per layer: RotatingKVCache when max_size is given (quantized when bits is given too),
    else QuantizedKVCache when bits is given, else KVCache. group_size defaults to 64, or to 32 for a head_dim
    that 64 does not divide."""
    if group_size is None:
        group_size = 64 if cfg.head_dim % 64 == 0 else 32
    if bits is not None:
        _check_quantization(bits, group_size)
        if cfg.head_dim % group_size:
            fits = [g for g in GROUP_SIZES if cfg.head_dim % g == 0]
            hint = f"; use {fits[-1]}" if fits else ""
            raise CacheError(f"KV group size {group_size} (--kv-group-size) does not divide the model's head_dim "
                             f"{cfg.head_dim}{hint}")
    n = cfg.num_hidden_layers
    if max_size is not None:
        return [RotatingKVCache(max_size, keep, slack=slack, bits=bits, group_size=group_size) for _ in range(n)]
    if bits is not None:
        return [QuantizedKVCache(bits, group_size) for _ in range(n)]
    return [KVCache() for _ in range(n)]


# ------------------------------------------------------------------------------------------ prompt-cache files

_FORMAT = "qwen-mlx prompt cache"
_VERSION = 1
_FLOAT_PARTS = ("keys", "values")
_QUANT_PARTS = ("keys", "keys_scales", "keys_biases", "values", "values_scales", "values_biases")
_FLOAT_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
_MAX_POSITION = 2**30  # offsets beyond this are not a real cache (and would overflow int32 positions)


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
    if len(caches) != model.config.num_hidden_layers:
        raise CacheError(f"{path}: {len(caches)} caches given for a model of {model.config.num_hidden_layers} "
                         "layers")
    tokens = [int(t) for t in tokens]
    if tokens and any(len(tokens) != c.offset for c in caches):
        raise CacheError(f"{path}: {len(tokens)} token ids given for caches holding {caches[0].offset} tokens")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    arrays: dict[str, mx.array] = {}
    layers = []
    for i, cache in enumerate(caches):
        tensors, info = _cache_state(cache)
        arrays.update({f"layers.{i}.{name}": a for name, a in tensors.items()})
        layers.append(info)
    header = {"format": _FORMAT, "version": _VERSION, "model": model_fingerprint(model), "tokens": tokens,
              "metadata": meta, "layers": layers}
    # mx.save_safetensors appends ".safetensors" to a name without it: the temporary name ends with it.
    with replacing(path, suffix=".tmp.safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={"qwen_mlx": json.dumps(header)})


def _cache_state(cache: LayerCache) -> tuple[dict[str, mx.array], dict]:
    if isinstance(cache, KVCache):
        n, info = cache.offset, {"kind": "kv", "offset": cache.offset}
    elif isinstance(cache, QuantizedKVCache):
        n = cache.offset
        info = {"kind": "quantized", "offset": cache.offset, "bits": cache.bits, "group_size": cache.group_size}
    elif isinstance(cache, RotatingKVCache):
        n = cache._used
        info = {"kind": "rotating", "offset": cache.offset, "max_size": cache.max_size, "keep": cache.keep,
                "slack": cache.slack, "lo": cache._lo, "bits": cache.bits, "group_size": cache.group_size}
    else:
        raise TypeError(f"cannot save a {type(cache).__name__}")
    store = cache._store
    if n == 0 or store.arrays is None:
        return {}, info
    names = _FLOAT_PARTS if store.bits is None else _QUANT_PARTS
    return dict(zip(names, store.view(n))), info


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
    caches = [_restore(info, {name.split(".", 2)[2]: a for name, a in arrays.items()
                              if name.startswith(f"layers.{i}.")}) for i, info in enumerate(layers)]
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_SETTINGS = {"kv": {"kind", "offset"}, "quantized": {"kind", "offset", "bits", "group_size"},
             "rotating": {"kind", "offset", "max_size", "keep", "slack", "lo", "bits", "group_size"}}


def _check_layer(path: Path, i: int, info: dict, cfg: ModelConfig, tensors: dict, B: int) -> dict:
    """Validate one layer's settings against the file's tensors; return {name: (dtype or "float", shape)} of
    the tensors the layer must have."""
    kind = info.get("kind")
    if kind not in _SETTINGS:
        raise CacheFileError(f"{path}: layer {i} has unknown cache kind {kind!r}")
    bad = CacheFileError(f"{path}: layer {i} has invalid {kind} cache settings")
    if set(info) != _SETTINGS[kind] or not all(_is_int(info[k]) for k in _SETTINGS[kind] - {"kind", "bits"}):
        raise bad
    offset, bits, group_size = info["offset"], info.get("bits"), info.get("group_size", 64)
    if not 0 <= offset <= _MAX_POSITION or (bits is not None and not _is_int(bits)):
        raise bad
    if kind == "quantized" and bits is None:
        raise bad
    try:
        _check_quantization(bits, group_size)
        if kind == "rotating":  # the constructor's own checks
            RotatingKVCache(info["max_size"], info["keep"], slack=info["slack"], bits=bits, group_size=group_size)
    except CacheError:
        raise bad from None
    if bits is not None and cfg.head_dim % group_size:
        raise CacheFileError(f"{path}: layer {i}'s group size {group_size} does not divide head_dim {cfg.head_dim}")
    if kind == "rotating":
        keep, lo = info["keep"], info["lo"]
        capacity = info["max_size"] + info["slack"]
        if capacity > _MAX_POSITION or not keep <= lo <= max(offset, keep) or lo < offset - (capacity - keep):
            raise bad
        least, most = _needed_slots(offset, lo, keep, capacity - keep), capacity
    else:
        least = most = offset
    parts = _FLOAT_PARTS if bits is None else _QUANT_PARTS
    names = [f"layers.{i}.{p}" for p in parts]
    present = [n for n in names if n in tensors]
    if not present and least == 0:
        return {}
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CacheFileError(f"{path}: tensor {missing[0]} is missing")
    shape = tensors[names[0]][1]
    slots = shape[2] if len(shape) == 4 else -1
    if not least <= slots <= most:
        raise CacheFileError(f"{path}: tensor {names[0]} holds {slots} tokens, the layer's settings need "
                             f"{least if least == most else f'{least} to {most}'}")
    return {n: (dtype, (B, cfg.num_key_value_heads, slots, last))
            for n, (dtype, last) in zip(names, _part_layout(cfg.head_dim, bits, group_size))}


def _needed_slots(offset: int, lo: int, keep: int, ring: int) -> int:
    """How many leading slots of a rotating cache hold its valid tokens: the pinned ones, and the ring ones
    at positions [max(lo, keep), offset)."""
    n = min(offset, keep)
    first = max(lo, keep)
    if offset > first:
        if offset - first >= ring or (first - keep) // ring != (offset - 1 - keep) // ring:
            return keep + ring  # the held range wraps around the end of the ring
        n = keep + (offset - 1 - keep) % ring + 1
    return n


def _part_layout(head_dim: int, bits: int | None, group_size: int) -> list[tuple[str, int]]:
    """(safetensors dtype or "float", last dimension) of each stored part, as mx.quantize lays them out."""
    if bits is None:
        return [("float", head_dim)] * 2
    q, scales, biases = mx.quantize(mx.zeros((1, head_dim)), group_size=group_size, bits=bits)
    packed = {mx.uint32: "U32", mx.uint8: "U8"}[q.dtype]
    return [(packed, q.shape[-1]), ("float", scales.shape[-1]), ("float", biases.shape[-1])] * 2


def _restore(info: dict, parts: dict[str, mx.array]) -> LayerCache:
    kind = info["kind"]
    if kind == "kv":
        cache = KVCache()
    elif kind == "quantized":
        cache = QuantizedKVCache(info["bits"], info["group_size"])
    else:
        cache = RotatingKVCache(info["max_size"], info["keep"], slack=info["slack"], bits=info["bits"],
                                group_size=info["group_size"])
        cache._lo = info["lo"]
    if parts:
        names = _FLOAT_PARTS if cache._store.bits is None else _QUANT_PARTS
        cache._store.arrays = [parts[n] for n in names]
        if isinstance(cache, RotatingKVCache):
            cache._used = cache._store.size
    cache.offset = info["offset"]
    return cache
