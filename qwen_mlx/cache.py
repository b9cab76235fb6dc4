"""Per-layer KV caches. A cache owns its position (`offset`), its storage and the attention over it."""

from __future__ import annotations

import mlx.core as mx

from .config import ModelConfig


class KVCache:
    """Keys and values of every token seen, preallocated in steps of `step` tokens and returned as views."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None  # (B, n_kv, capacity, head_dim)
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, n_kv, L, head_dim = keys.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            capacity = (end + self.step - 1) // self.step * self.step
            new_k = mx.zeros((B, n_kv, capacity, head_dim), keys.dtype)
            new_v = mx.zeros((B, n_kv, capacity, values.shape[-1]), values.dtype)
            if self.keys is not None:
                new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
                new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        keys, values = self.update_and_fetch(k, v)
        # "causal" is bottom-right aligned: query i (position offset + i) sees keys 0 .. offset + i.
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask="causal")

    def trim(self, n: int) -> int:
        """Forget the last n tokens (n is clipped to what is held); returns how many were removed."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def state(self) -> list[mx.array]:
        """The arrays that hold what the cache has seen (what to evaluate after a prefill chunk)."""
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(cfg: ModelConfig) -> list[KVCache]:
    return [KVCache() for _ in range(cfg.num_hidden_layers)]
