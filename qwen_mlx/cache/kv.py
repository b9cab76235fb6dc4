"""Per-layer KV caches. A cache owns its position (`offset`), its storage and the attention over it.

    KVCache            every token, float; grows in steps of 256 tokens
    QuantizedKVCache   every token, K/V group-quantized (mx.quantize); attention by quantized matmuls
    RotatingKVCache    fixed memory: the first `keep` tokens plus a ring of the most recent ones; float or quantized
    make_cache         one cache per layer, the kind chosen from the arguments

Each cache describes itself for a prompt-cache file (files.py): `state` (its arrays), `meta_state` (its settings and
position, JSON numbers), `state_layout` (what a valid state looks like for given settings) and `from_state`.

Keys are cached after RoPE, so a cached key never moves: `offset` is the absolute position of the next token
(the RoPE offset of the next step) and keeps increasing when a ring wraps.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import ClassVar

import mlx.core as mx

from qwen_mlx.cache.layout import MAX_POSITION, StateLayout, read_settings
from qwen_mlx.cache.recurrent import RecurrentCache
from qwen_mlx.cache.store import GROUP_SIZES, CacheError, Store, check_quantization, needed_slots
from qwen_mlx.models.config import ModelConfig


def _kv_layout(cfg: ModelConfig, bits: int | None, group_size: int, tokens: tuple[int, int]) -> StateLayout:
    """K and V (B, n_kv, tokens, head_dim) float, or their parts as mx.quantize lays them out: packed (B, n_kv,
    tokens, head_dim * bits / 32), scales and biases (B, n_kv, tokens, head_dim / group_size)."""
    n_kv, head_dim = cfg.num_key_value_heads, cfg.head_dim
    if bits is None:
        return StateLayout({"keys": ("float", (n_kv, None, head_dim)), "values": ("float", (n_kv, None, head_dim))},
                           tokens)
    if head_dim % group_size:
        raise CacheError(f"KV group size {group_size} does not divide the model's head_dim {head_dim}")
    q, scales, biases = mx.quantize(mx.zeros((1, head_dim)), group_size=group_size, bits=bits)
    packed = {mx.uint32: "U32", mx.uint8: "U8"}[q.dtype]
    parts = {"": (packed, q.shape[-1]), "_scales": ("float", scales.shape[-1]), "_biases": ("float", biases.shape[-1])}
    return StateLayout({f"{kv}{suffix}": (dtype, (n_kv, None, last)) for kv in ("keys", "values")
                        for suffix, (dtype, last) in parts.items()}, tokens)


# ---------------------------------------------------------------------------------------------- growing caches


class _StoredCache:
    """What the caches share: a position (`offset`) and a Store."""

    kind: ClassVar[str]  # the cache's name in a prompt-cache file
    _store: Store
    offset: int
    options: dict  # the make_cache options (and constructor arguments) that build caches of this kind and settings

    def empty(self) -> _StoredCache:
        """A new empty cache of the same kind and settings."""
        return type(self)(**self.options)

    def trim(self, n: int) -> int:
        """Forget the last n tokens (n is clipped to what is held); returns how many were removed. Exact."""
        n = max(0, min(n, self.offset))
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    @property
    def _held(self) -> int:
        """How many leading slots of the storage hold data."""
        return self.offset

    @property
    def state(self) -> list[mx.array]:
        """The arrays that hold what the cache has seen, over the slots in use (what to evaluate after a prefill
        chunk, what a prompt-cache file stores); empty before the first token. Order: state_layout's."""
        return [] if self._store.arrays is None or self._held == 0 else self._store.view(self._held)

    def _set_state(self, state: list[mx.array], offset: int) -> None:
        self._store.arrays = list(state) or None
        self.offset = offset

    def copy(self):
        """An independent cache holding the same tokens. Cheap: MLX arrays are values, so the copy's arrays share
        memory with these until either cache writes (a write makes a new array, the other keeps the old one)."""
        new = copy.copy(self)
        new._store = copy.copy(self._store)
        if self._store.arrays is not None:
            new._store.arrays = [a[...] for a in self._store.arrays]
        return new

    def plan_step(self) -> tuple[tuple, list[int]] | None:
        """For a compiled decode step (engine/step.py): make room for one more token; return (what a trace depends
        on, buffer size last; [position, slot, lo, used] once the token is written), or None when there is no
        storage yet (that step runs eagerly)."""
        if self._store.arrays is None:
            return None
        self._store.reserve(self.offset + 1, self._store.arrays)
        return (self.kind, self._store.bits, self._store.group_size, self._store.size), \
            [self.offset, self.offset, 0, self.offset + 1]

    @property
    def buffers(self) -> list[mx.array]:
        """The whole preallocated storage, unused slots included (what a step writes into)."""
        return self._store.arrays or []

    def step_mask(self, size: int, where: mx.array) -> mx.array:
        """The first `size` slots' visibility to one decode token, (1, size) bool: those up to its own position."""
        return (mx.arange(size) <= where[0])[None]

    def finish_step(self, buffers: list[mx.array]) -> None:
        """Take the storage a compiled step wrote the token into."""
        self._store.arrays = buffers
        self.offset += 1


class KVCache(_StoredCache):
    """Keys and values of every token seen, float, preallocated in steps of 256 tokens and returned as views."""

    kind = "kv"

    def __init__(self):
        self._store = Store(None, 0)
        self.offset = 0

    @property
    def options(self) -> dict:
        return {}

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset}

    @classmethod
    def state_layout(cls, meta_state: Mapping, cfg: ModelConfig) -> StateLayout:
        """The state a KVCache with these settings holds for `cfg`; raises CacheError on invalid settings."""
        (offset,) = read_settings(meta_state, ("offset",))
        return _kv_layout(cfg, None, 0, (offset, offset))

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: Mapping) -> KVCache:
        cache = cls()
        cache._set_state(state, meta_state["offset"])
        return cache

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

    kind = "quantized"

    def __init__(self, bits: int = 8, group_size: int = 64):
        check_quantization(bits, group_size)
        self.bits, self.group_size = bits, group_size
        self._store = Store(bits, group_size)
        self.offset = 0

    @property
    def options(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def state_layout(cls, meta_state: Mapping, cfg: ModelConfig) -> StateLayout:
        """The state a QuantizedKVCache with these settings holds for `cfg`; raises CacheError on invalid ones."""
        offset, bits, group_size = read_settings(meta_state, ("offset", "bits", "group_size"))
        check_quantization(bits, group_size)
        return _kv_layout(cfg, bits, group_size, (offset, offset))

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: Mapping) -> QuantizedKVCache:
        cache = cls(meta_state["bits"], meta_state["group_size"])
        cache._set_state(state, meta_state["offset"])
        return cache

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

    kind = "rotating"

    def __init__(self, max_size: int, keep: int = 4, *, slack: int | None = None, bits: int | None = None,
                 group_size: int = 64):
        if slack is None:
            slack = default_slack(max_size)
        _check_window(max_size, keep, slack)
        check_quantization(bits, group_size)
        self.max_size, self.keep, self.slack = max_size, keep, slack
        self.bits, self.group_size = bits, group_size
        self._store = Store(bits, group_size)
        self.offset = 0
        self._lo = keep  # oldest non-pinned position still held; held: [max(_lo, keep), offset)
        self._used = 0  # slots ever written (the prefix of the storage that holds data)

    @property
    def options(self) -> dict:
        return {"max_size": self.max_size, "keep": self.keep, "slack": self.slack, "bits": self.bits,
                "group_size": self.group_size}

    @property
    def meta_state(self) -> dict[str, int | None]:
        return {"offset": self.offset, "max_size": self.max_size, "keep": self.keep, "slack": self.slack,
                "lo": self._lo, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def state_layout(cls, meta_state: Mapping, cfg: ModelConfig) -> StateLayout:
        """The state a RotatingKVCache with these settings holds for `cfg`: the slots in use, from those that hold
        its valid tokens to the whole capacity. Raises CacheError on invalid settings."""
        offset, max_size, keep, slack, lo, bits, group_size = read_settings(
            meta_state, ("offset", "max_size", "keep", "slack", "lo", "bits", "group_size"), nullable=("bits",))
        _check_window(max_size, keep, slack)
        check_quantization(bits, group_size)
        capacity = max_size + slack
        if capacity > MAX_POSITION or not keep <= lo <= max(offset, keep) or lo < offset - (capacity - keep):
            raise CacheError(f"a rotating cache's held range {lo}..{offset} does not fit its window")
        return _kv_layout(cfg, bits, group_size, (needed_slots(offset, lo, keep, capacity - keep), capacity))

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: Mapping) -> RotatingKVCache:
        m = meta_state
        cache = cls(m["max_size"], m["keep"], slack=m["slack"], bits=m["bits"], group_size=m["group_size"])
        cache._set_state(state, m["offset"])
        cache._lo, cache._used = m["lo"], cache._store.size
        return cache

    @property
    def _held(self) -> int:
        return self._used

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
        return self._positions(mx.arange(self._used), self.offset, self._lo, self._used)

    def _positions(self, s: mx.array, offset: int | mx.array, lo: int | mx.array, used: int | mx.array) -> mx.array:
        """The absolute position held in each slot of s (S,), -1 where it holds nothing valid, for a cache holding
        `offset` tokens with oldest ring position `lo` and `used` slots written (ints, or scalar arrays in a trace)."""
        keep, ring = self.keep, self._ring
        pinned = mx.where(s < offset, s, -1)
        newest_slot = keep + (offset - 1 - keep) % ring  # slot of the newest ring token (if any)
        p = offset - 1 - (newest_slot - s + ring) % ring  # newest position < offset that maps to slot s
        ring_pos = mx.where((p >= mx.maximum(lo, keep)) & (s < used), p, -1)
        return mx.where(s < keep, pinned, ring_pos)

    def _slot(self, position: int) -> int:
        return position if position < self.keep else self.keep + (position - self.keep) % self._ring

    def plan_step(self) -> tuple[tuple, list[int]] | None:
        if self._store.arrays is None:
            return None
        start, slot = self.offset, self._slot(self.offset)
        self._store.reserve(slot + 1, self._store.arrays, limit=self.capacity)
        settings = (self.kind, self.bits, self.group_size, self.max_size, self.keep, self.slack, self._store.size)
        return settings, [start, slot, max(self._lo, start + 1 - self._ring, self.keep), max(self._used, slot + 1)]

    def step_mask(self, size: int, where: mx.array) -> mx.array:
        """The window of the token at position where[0] (the class docstring's) over the first `size` slots as
        they are once it is written, (1, size) bool."""
        t, j = where[0], self._positions(mx.arange(size), where[0] + 1, where[2], where[3])
        return ((j >= 0) & (j <= t) & ((j < self.keep) | (j > t - (self.max_size - self.keep))))[None]

    def finish_step(self, buffers: list[mx.array]) -> None:
        self._used = max(self._used, self._slot(self.offset) + 1)
        self._store.arrays = buffers
        self.offset += 1
        self._lo = max(self._lo, self.offset - self._ring, self.keep)

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


def _check_window(max_size: int, keep: int, slack: int) -> None:
    if max_size < 1 or keep < 0 or keep >= max_size:
        raise CacheError(f"the KV window (--max-kv-size, {max_size}) must be larger than the {keep} tokens it pins "
                         "(and the pinned count cannot be negative)")
    if slack < 0:
        raise CacheError(f"the rotating cache's slack must not be negative: got {slack}")


MIN_SLACK = 8  # a speculative round's rejected drafts (up to engine.speculative.MAX_DRAFT) stay trimmable


def default_slack(max_size: int) -> int:
    """Extra ring slots kept beyond the window, for exact trims after wrapping: max_size / 8, at least MIN_SLACK,
    at most 256."""
    return max(MIN_SLACK, min(256, max_size // 8))


LayerCache = KVCache | QuantizedKVCache | RotatingKVCache | RecurrentCache


def make_cache(cfg: ModelConfig, *, max_size: int | None = None, keep: int = 4, slack: int | None = None,
               bits: int | None = None, group_size: int | None = None) -> list[LayerCache]:
    """One cache per layer: RotatingKVCache when max_size is given (quantized when bits is given too),
    else QuantizedKVCache when bits is given, else KVCache. group_size defaults to 64, or to 32 for a head_dim
    that 64 does not divide. A hybrid model's linear-attention layers get a RecurrentCache (fixed size by nature:
    the window and the KV quantization apply to the attention layers)."""
    if group_size is None:
        group_size = 64 if cfg.head_dim % 64 == 0 else 32
    if bits is not None:
        check_quantization(bits, group_size)
        if cfg.head_dim % group_size:
            fits = [g for g in GROUP_SIZES if cfg.head_dim % g == 0]
            raise CacheError(f"KV group size {group_size} (--kv-group-size) does not divide the model's head_dim "
                             f"{cfg.head_dim}" + (f"; use {fits[-1]}" if fits else ""))

    def kv_cache() -> LayerCache:
        if max_size is not None:
            return RotatingKVCache(max_size, keep, slack=slack, bits=bits, group_size=group_size)
        return QuantizedKVCache(bits, group_size) if bits is not None else KVCache()

    return [RecurrentCache() if cfg.is_linear_layer(i) else kv_cache() for i in range(cfg.num_hidden_layers)]
