"""Continuous batching's decode step: B sequences, each with its own per-layer caches, in one forward.

The sequences' last tokens go through the model as one batch (B, 1), so every weight is read once per step for all
of them; attention alone runs per sequence, each over its own cache (any kind, any length: no padding, no shared
storage). Sequences join and leave between steps by being in the list or not.
"""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.engine.generate import logits_last
from qwen_mlx.models.qwen3 import Cache, Model


class BatchCache:
    """One layer's caches of B sequences, seen by the model as one cache: `offset` holds each sequence's position
    (B,) (RoPE rotates each row by its own), `attend` splits the batch and lets each sequence's cache attend."""

    def __init__(self, caches: list[Cache]):
        self.caches = caches
        self.offset = mx.array([c.offset for c in caches], dtype=mx.int32)  # (B,)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """q (B, heads, L, head_dim), k and v (B, n_kv, L, head_dim) -> (B, heads, L, head_dim)."""
        rows = [c.attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], scale) for b, c in enumerate(self.caches)]
        return mx.concatenate(rows, axis=0)

    @property
    def state(self) -> list[mx.array]:
        return [a for c in self.caches for a in c.state]


def decode_logits(model: Model, tokens: list[int], caches: list[list[Cache]]) -> mx.array:
    """The float32 next-token logits (B, vocab) of B sequences, each after its last token tokens[b], which is
    appended to its own per-layer caches caches[b]. One sequence runs exactly as generate's decode step."""
    last = mx.array(tokens, dtype=mx.uint32)  # (B,)
    if len(caches) == 1:
        return logits_last(model, last, caches[0])
    layers = [BatchCache(list(sequences)) for sequences in zip(*caches)]  # per layer: the B sequences' caches
    h = model.model(last[:, None], layers)  # (B, 1, dim)
    return model.head(h)[:, -1, :].astype(mx.float32)  # (B, vocab)
