"""Rotary position embedding frequencies: default and YaRN, NeoX (split-half) layout.

Qwen rotates the two halves of each head: for i < d/2, (x[i], x[i + d/2]) is rotated by position * inv_freq[i].
YaRN (https://arxiv.org/abs/2309.00071) interpolates the low frequencies by `factor`, keeps the high ones, ramps
linearly in between, and multiplies cos/sin by an attention factor. Scaling both q and k by that factor is the same
as scaling the attention logits by its square, which is how the model applies it (see `softmax_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from qwen_mlx.models.config import ModelConfig, RopeScaling


@dataclass(frozen=True)
class Rope:
    inv_freq: mx.array  # (rotary_dim // 2,) float32, radians per position
    attention_factor: float  # multiplies cos and sin (1.0 without YaRN)
    wavelengths: mx.array  # 1 / inv_freq: the `freqs` argument of `mx.fast.rope` (angle = position / freqs)


def _rope(inv_freq: mx.array, attention_factor: float) -> Rope:
    wavelengths = 1.0 / inv_freq
    # Evaluated now, on this thread's stream: a lazy constant would be computed later on whichever thread first
    # runs the model, and MLX streams belong to the thread that made them.
    mx.eval(inv_freq, wavelengths)
    return Rope(inv_freq, attention_factor, wavelengths)


def make_rope(cfg: ModelConfig) -> Rope:
    dim = cfg.rotary_dim  # the hybrid models turn only the first partial_rotary_factor of each head
    inv_freq = 1.0 / cfg.rope_theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim)
    if cfg.rope_scaling is None:
        return _rope(inv_freq, 1.0)
    return _yarn(inv_freq, dim, cfg.rope_theta, cfg.rope_scaling)


def _yarn(inv_freq: mx.array, dim: int, base: float, s: RopeScaling) -> Rope:
    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = mx.clip((mx.arange(dim // 2, dtype=mx.float32) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency; 0: divide it by factor
    inv_freq = inv_freq / s.factor * (1.0 - extrapolate) + inv_freq * extrapolate
    attention_factor = s.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return _rope(inv_freq, attention_factor)


def softmax_scale(cfg: ModelConfig, rope: Rope) -> float:
    """Attention logit scale: 1/sqrt(head_dim) times the YaRN attention factor on both q and k."""
    return cfg.head_dim**-0.5 * rope.attention_factor**2


def cos_sin(rope: Rope, offset: int, length: int) -> tuple[mx.array, mx.array]:
    """cos and sin for positions offset .. offset + length - 1, each (length, head_dim // 2)."""
    positions = mx.arange(offset, offset + length, dtype=mx.float32)
    angles = positions[:, None] * rope.inv_freq[None, :]
    return mx.cos(angles), mx.sin(angles)


def rotate_reference(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Plain-ops NeoX rotation, the definition the fast paths are tested against. x: (B, H, L, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
