"""The K and V of one layer, float or group-quantized (mx.quantize), and attention over them; what every KV cache
kind (kv.py) stores its tokens in."""

from __future__ import annotations

import math

import mlx.core as mx

from qwen_mlx.errors import UserError
from qwen_mlx.quant_formats import QUANT_FORMATS

STEP = 256  # storage grows by this many tokens at a time
BITS, GROUP_SIZES = QUANT_FORMATS["affine"]  # what mx.quantize's affine mode stores


class CacheError(UserError, ValueError):
    """Cache settings that cannot work (the message names the setting and its CLI flag)."""


class Store:
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


def check_quantization(bits: int | None, group_size: int) -> None:
    if bits is not None and bits not in BITS:
        raise CacheError(f"KV cache bits (--kv-bits) must be one of {', '.join(map(str, BITS))}: got {bits}")
    if group_size not in GROUP_SIZES:
        raise CacheError(f"KV group size (--kv-group-size) must be one of "
                         f"{', '.join(map(str, GROUP_SIZES))}: got {group_size}")


def needed_slots(offset: int, lo: int, keep: int, ring: int) -> int:
    """How many leading slots of a rotating cache hold its valid tokens: the pinned ones, and the ring ones
    at positions [max(lo, keep), offset)."""
    n = min(offset, keep)
    first = max(lo, keep)
    if offset > first:
        if offset - first >= ring or (first - keep) // ring != (offset - 1 - keep) // ring:
            return keep + ring  # the held range wraps around the end of the ring
        n = keep + (offset - 1 - keep) % ring + 1
    return n


class StepView:
    """A layer's cache as a compiled decode step sees it: the position is a scalar array (one trace serves every
    position) and the storage is the whole preallocated buffer (its shape repeats until it grows by STEP), so the
    token is written at an array slot, and attention reads a fixed prefix of the slots (mask.shape[-1] of them, a
    trace's constant) and masks those outside the token's window instead of slicing them."""

    def __init__(self, kind, buffers: list[mx.array], where: mx.array, mask: mx.array):
        self.offset = where[0]  # the token's position: RoPE takes an array
        self._store, self.buffers, self._slot, self._mask = kind._store, buffers, where[1:2], mask

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """Write k, v (B, n_kv, 1, head_dim) at the planned slot; attend q (B, heads, 1, head_dim) over the window."""
        parts = self._store.encode(k, v)
        self.buffers = [mx.slice_update(b, p, self._slot, axes=(2,)) for b, p in zip(self.buffers, parts)]
        n = self._mask.shape[-1]
        read = self.buffers if n == self.buffers[0].shape[2] else [b[..., :n, :] for b in self.buffers]
        return self._store.attend(q, read, scale, self._mask)
