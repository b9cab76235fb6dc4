"""Will a run fit in GPU memory? Weights plus the KV cache, the model's and its draft model's or MTP head's, against
the working set the GPU can use without paging (Apple silicon: `max_recommended_working_set_size` in MLX's device
info), checked before any weight is read; and the wired-memory limit, raised while a command runs and restored
however it ends.

Where MLX reports no working set (the CPU backend, CUDA) nothing is checked and no limit is changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx

from qwen_mlx.cache.kv import default_slack
from qwen_mlx.cache.store import STEP
from qwen_mlx.errors import UserError
from qwen_mlx.models.config import ModelConfig


class MemoryCheckError(UserError):
    """A model and KV cache larger than the GPU's recommended working set (the message names --force)."""


@dataclass(frozen=True)
class Footprint:
    """What one model of a run holds, in bytes: its weights once loaded and the most its caches reach."""

    weights: int
    kv_cache: int


@dataclass(frozen=True)
class MemoryPlan:
    """What a run will hold besides its weights: the KV cache it is asked for."""

    context: int = 0  # tokens the run may put in the KV cache (prompt and reply)
    max_kv_size: int | None = None  # a rotating window (--max-kv-size): the cache never holds more
    kv_bits: int | None = None
    kv_group_size: int | None = None
    force: bool = False  # load even when it does not fit (--force)


def recommended_working_set() -> int | None:
    """Bytes the GPU can use without paging, or None where MLX does not report it (CPU, CUDA)."""
    value = mx.device_info().get("max_recommended_working_set_size")
    return int(value) if value else None


def kv_cache_bytes(cfg: ModelConfig, plan: MemoryPlan, element_bytes: int) -> int:
    """The most bytes the caches make_cache builds for `plan` reach: each attention layer's K and V
    (attention_layer_bytes) and each linear-attention layer's state. `element_bytes`: the size of the activations'
    dtype."""
    attention = sum(not cfg.is_linear_layer(i) for i in range(cfg.num_hidden_layers))
    return attention * attention_layer_bytes(cfg, plan, element_bytes) + recurrent_state_bytes(cfg, element_bytes)


def attention_layer_bytes(cfg: ModelConfig, plan: MemoryPlan, element_bytes: int) -> int:
    """The most bytes one attention layer's K and V reach (a model's layer, or the MTP head's one): storage grows
    in steps of 256 tokens, a rotating cache stops at its window plus slack. A KV group size that does not divide
    head_dim counts as make_cache's default (what a draft model's cache falls back to)."""
    tokens = -(-plan.context // STEP) * STEP
    if plan.max_kv_size is not None:
        tokens = min(tokens, plan.max_kv_size + default_slack(plan.max_kv_size))
    d = cfg.head_dim
    if plan.kv_bits is None:
        per_vector = d * element_bytes
    else:
        group = plan.kv_group_size
        if group is None or d % group:  # make_cache's default, which a draft's cache falls back to
            group = 64 if d % 64 == 0 else 32
        per_vector = d * plan.kv_bits // 8 + 2 * (d // group) * element_bytes  # packed values, scales, biases
    return 2 * cfg.num_key_value_heads * tokens * per_vector


def recurrent_state_bytes(cfg: ModelConfig, element_bytes: int) -> int:
    """The linear-attention layers' caches (cache.recurrent.RecurrentCache), whatever the context: the conv's last
    width - 1 inputs (activations' dtype) and the float32 state (value heads, key dim, value dim)."""
    linear = sum(cfg.is_linear_layer(i) for i in range(cfg.num_hidden_layers))
    if not linear:
        return 0
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
        cfg.linear_num_value_heads * cfg.linear_value_head_dim
    tail = (cfg.linear_conv_kernel_dim - 1) * conv_dim * element_bytes
    state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return linear * (tail + state)


def check_fits(what: str, model: Footprint, force: bool, beside: dict[str, Footprint] | None = None) -> None:
    """Refuse (MemoryCheckError) when the weights + KV caches of the model and of what runs beside it (`beside`,
    by name: a draft model, an MTP head) exceed the recommended working set, unless `force`."""
    limit = recommended_working_set()
    parts = {"": model, **(beside or {})}
    total = sum(p.weights + p.kv_cache for p in parts.values())
    if limit is None or force or total <= limit:
        return
    weights = " + ".join(f"{name} {_gib(p.weights)}".lstrip() for name, p in parts.items())
    kv_cache = " + ".join(f"{name} {_gib(p.kv_cache)}".lstrip() for name, p in parts.items())
    raise MemoryCheckError(
        f"{what}: needs about {_gib(total)} (weights {weights}, KV cache {kv_cache}), more than the {_gib(limit)} "
        f"this GPU can use without paging; choose a smaller or more quantized model{' (or draft)' if beside else ''}"
        " or a smaller --max-tokens or --max-kv-size, or pass --force to load it anyway")


@contextmanager
def wired_limit() -> Iterator[None]:
    """Let up to the recommended working set stay wired (resident) while the block runs, as mlx-lm does when it
    generates; the previous limit comes back however the block ends."""
    limit = recommended_working_set()
    if limit is None:
        yield
        return
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        try:
            mx.synchronize()  # nothing in flight still counts on the wired memory
        finally:
            mx.set_wired_limit(previous)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
