"""Backend choice and one function per fused op; the reference path (MLX ops) runs anywhere."""

import mlx.core as mx


def backend() -> str:
    """Which implementation the fused ops use: "reference" (MLX ops) until the custom kernels land."""
    return "reference"


def rope(x: mx.array, *, offset, freqs: mx.array) -> mx.array:
    """NeoX-layout rotary embedding of x (B, n_heads, L, head_dim) at positions offset .. offset + L - 1."""
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)


def gather_mm(x: mx.array, w: mx.array, experts: mx.array, sorted_experts: bool) -> mx.array:
    """x @ w[experts].T for stacked expert weights w (E, out, in); x (..., 1, in) -> (..., 1, out)."""
    if mx.default_device() == mx.cpu and x.dtype != mx.float32:
        # MLX's CPU GatherMM is float32-only: compute there in float32 (CPU is for tests, not speed).
        y = mx.gather_mm(x.astype(mx.float32), w.swapaxes(-1, -2).astype(mx.float32), rhs_indices=experts,
                         sorted_indices=sorted_experts)
        return y.astype(x.dtype)
    return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=experts, sorted_indices=sorted_experts)
