"""Backend choice and one function per fused op.

`backend()` is "metal" on an Apple GPU, "cuda" on an NVIDIA GPU (MLX's CUDA build) and "reference" elsewhere;
the environment variable QWEN_MLX_KERNELS=reference|custom overrides the choice ("custom" insists on a GPU).
On "metal" and "cuda" the ops run our kernels (qmatmul.py, projections.py, gather_qmv.py, router.py, rope.py, one
source built for both) where they cover the case; everything else, and the whole "reference" path, runs MLX's own
ops, which the kernels are tested against.

The fused ops (`linears`, `swiglu`, `expert_swiglu`, `expert_sum`) take the model's layers: they fuse only layers
that declare `custom_kernels` (quant.py's, whose product is `qmatmul`/`gather_qmm` of their own parameters) and
otherwise call the layers, so that a layer swapped in from elsewhere (a distributed shard) keeps its own product.
"""

import os

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.errors import UserError
from qwen_mlx.kernels import dialect
from qwen_mlx.kernels import gated_delta as _gated_delta
from qwen_mlx.kernels import gather_qmv as _gather_qmv
from qwen_mlx.kernels import projections as _projections
from qwen_mlx.kernels import qmatmul as _qmatmul
from qwen_mlx.kernels import rope as _rope
from qwen_mlx.kernels import router as _router

ENV = "QWEN_MLX_KERNELS"
CHOICES = ("reference", "custom")


def gpu_backend() -> str | None:
    """"metal" or "cuda" when MLX computes on that GPU by default, else None."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def backend() -> str:
    """Which implementation the fused ops use: "metal", "cuda" or "reference" (MLX ops)."""
    choice = os.environ.get(ENV, "")
    if choice not in ("", *CHOICES):
        raise UserError(f"{ENV}={choice!r} is not a choice (use {' or '.join(CHOICES)}, or leave it unset)")
    if choice == "reference":
        return "reference"
    gpu = gpu_backend()
    if gpu is None and choice == "custom":
        raise UserError(f"{ENV}=custom needs a Metal or CUDA GPU as MLX's default device; this machine computes "
                        f"on {mx.default_device()}")
    return gpu or "reference"


def qmatmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
            mode: str = "affine") -> mx.array:
    """x (..., K) @ W.T -> (..., N) for W (N, K) quantized by mx.quantize (w packed uint32, scales, biases)."""
    used = backend()
    if used != "reference" and _qmatmul.dispatched(x, used) and _qmatmul.supports(x, w, biases, group_size, bits, mode):
        return dialect.run(_qmatmul.KERNEL, used, _qmatmul.launch(x, w, scales, biases, group_size, bits))[0]
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


def gather_qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, experts: mx.array,
               group_size: int, bits: int, sorted_experts: bool, mode: str = "affine") -> mx.array:
    """x (..., 1 or k, 1, K) @ W[experts].T -> (..., k, 1, N) for stacked expert weights W (E, N, K) quantized by
    mx.quantize, experts (..., k); mx.gather_qmm's broadcasting. The decode sizes run our kernel on a GPU."""
    used = backend()
    if used != "reference" and _gather_qmv.supports(x, w, biases, experts, group_size, bits, mode):
        return dialect.run(_gather_qmv.KERNEL, used, _gather_qmv.launch(x, w, scales, biases, experts, group_size,
                                                                        bits))[0]
    return mx.gather_qmm(x, w, scales, biases, rhs_indices=experts, transpose=True, group_size=group_size, bits=bits,
                         mode=mode, sorted_indices=sorted_experts)


def _quantized_alike(layers) -> tuple[int, int] | None:
    """(group_size, bits) when every layer is one of ours, affine-quantized with those same settings; else None."""
    first = layers[0]
    if not all(getattr(layer, "custom_kernels", False) and layer.mode == "affine" and "biases" in layer
               and (layer.group_size, layer.bits) == (first.group_size, first.bits) for layer in layers):
        return None
    return first.group_size, first.bits


def _matrix(layer: nn.Module) -> tuple[mx.array, mx.array, mx.array]:
    return layer["weight"], layer["scales"], layer["biases"]


def linears(x: mx.array, *layers: nn.Module) -> list[mx.array]:
    """[layer(x) for layer in layers] for 2 or 3 linear layers of one input (Q, K and V); one launch on a GPU when
    they are our quantized layers with one quantization."""
    used, alike = backend(), _quantized_alike(layers)
    if used != "reference" and alike and _qmatmul.dispatched(x, used):
        matrices = [_matrix(layer) for layer in layers]
        if _projections.supports(x, matrices, *alike):
            ys = dialect.run(_projections.parts_kernel(len(layers)), used,
                             _projections.launch_parts(x, matrices, *alike))
            return [y + layer["bias"] if "bias" in layer else y for y, layer in zip(ys, layers)]
    return [layer(x) for layer in layers]


def swiglu(x: mx.array, gate: nn.Module, up: nn.Module) -> mx.array:
    """silu(gate(x)) * up(x) (the MLP's activation); one launch on a GPU when gate and up are our quantized layers
    with one quantization and no bias."""
    used, alike = backend(), _quantized_alike((gate, up))
    if used != "reference" and alike and "bias" not in gate and "bias" not in up and _qmatmul.dispatched(x, used):
        matrices = [_matrix(gate), _matrix(up)]
        if gate["weight"].shape == up["weight"].shape and _projections.supports(x, matrices, *alike):
            return dialect.run(_projections.SWIGLU_KERNEL, used, _projections.launch_swiglu(x, *matrices, *alike))[0]
    return nn.silu(gate(x)) * up(x)


def expert_swiglu(x: mx.array, gate_up: nn.Module, experts: mx.array, sorted_experts: bool) -> mx.array:
    """silu(g) * u for [g, u] = gate_up(x, experts) split in halves (the experts' joined gate/up stack, gate rows
    first): x (..., 1 or k, 1, dim) -> (..., k, 1, hidden). One launch on a GPU at decode sizes."""
    used, alike = backend(), _quantized_alike((gate_up,))
    if used != "reference" and alike:
        w, scales, biases = _matrix(gate_up)
        if w.shape[1] % 2 == 0 and _gather_qmv.supports(x, w, biases, experts, *alike, "affine"):
            return dialect.run(_gather_qmv.SWIGLU_KERNEL, used,
                               _gather_qmv.launch_swiglu(x, w, scales, biases, experts, *alike))[0]
    gate, up = mx.split(gate_up(x, experts, sorted_experts), 2, axis=-1)
    return nn.silu(gate) * up


def expert_sum(h: mx.array, down: nn.Module, experts: mx.array, weights: mx.array) -> mx.array:
    """The routed experts' down projections weighted and added: sum over j of weights[..., j] *
    down(h[..., j, :, :], experts[..., j]) for h (..., k, 1, hidden), experts and weights (..., k) -> (..., dim).
    One launch on a GPU at decode sizes (the k products are added in registers)."""
    used, alike = backend(), _quantized_alike((down,))
    if used != "reference" and alike and _gather_qmv.sums(h, experts, weights):
        w, scales, biases = _matrix(down)
        if _gather_qmv.supports(h, w, biases, experts, *alike, "affine"):
            return dialect.run(_gather_qmv.SUM_KERNEL, used,
                               _gather_qmv.launch_sum(h, w, scales, biases, experts, weights, *alike))[0]
    y = down(h, experts).squeeze(-2)  # (..., k, dim)
    return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def route(logits: mx.array, top_k: int, norm_topk_prob: bool) -> tuple[mx.array, mx.array]:
    """The MoE router after its matmul: logits (..., E) -> the top-k experts of each token (..., k) and their
    softmax probabilities (..., k) float32, renormalized to sum to 1 when `norm_topk_prob`. One launch on a GPU."""
    used = backend()
    if used != "reference" and _router.supports(logits, top_k):
        experts, weights = dialect.run(_router.KERNEL, used, _router.launch(logits, top_k, norm_topk_prob))
        return experts, weights
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # (..., E)
    experts = mx.stop_gradient(mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(probs, experts, axis=-1)  # (..., k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return experts, weights


def rope(q: mx.array, k: mx.array, inv_freq: mx.array, wavelengths: mx.array, *, offset: int | mx.array,
         norms: tuple[mx.array, mx.array, float] | None = None, scale: float = 1.0) -> tuple[mx.array, mx.array]:
    """RoPE (NeoX split-half) on q (B, L, Hq, D) and k (B, L, Hk, D) at positions offset .. offset + L - 1,
    after a per-head RMSNorm when `norms` = (q weight, k weight, eps) is given -> (B, Hq, L, D), (B, Hk, L, D).

    The angle of pair i is position * inv_freq[i]; wavelengths = 1 / inv_freq (mx.fast.rope's `freqs`). `scale`
    multiplies cos and sin: YaRN's attention factor when it is applied here (the model folds it into the softmax).
    `offset` may be a vector (B,), one position per sequence (a batched decode step, L = 1): mx.fast.rope's path."""
    used = backend()
    if used != "reference" and _rope.supports(q, k) and (isinstance(offset, int) or offset.size == 1):
        return tuple(dialect.run(_rope.KERNEL, used, _rope.launch(q, k, inv_freq, offset, norms, scale)))
    if norms is not None:
        q_weight, k_weight, eps = norms
        q, k = mx.fast.rms_norm(q, q_weight, eps), mx.fast.rms_norm(k, k_weight, eps)
    q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)  # (B, heads, L, D)
    d = q.shape[-1]
    q = mx.fast.rope(q, d, traditional=False, base=None, scale=1.0, offset=offset, freqs=wavelengths)
    k = mx.fast.rope(k, d, traditional=False, base=None, scale=1.0, offset=offset, freqs=wavelengths)
    if scale != 1.0:
        q, k = q * scale, k * scale
    return q, k


def gated_delta_step(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                     state: mx.array) -> tuple[mx.array, mx.array]:
    """One decode token of the gated delta rule (kernels/gated_delta.py has the math): q, k (B, Hk, Dk)
    L2-normalised, q scaled by Dk**-0.5; v (B, Hv, Dv); g (B, Hv) log-decay; beta (B, Hv); state (B, Hv, Dk, Dv)
    float32 -> y (B, Hv, Dv) in v's dtype, the new state float32. One launch on a GPU."""
    used = backend()
    if used != "reference" and _gated_delta.supports(q, k, v, g, beta, state):
        y, new_state = dialect.run(_gated_delta.KERNEL, used, _gated_delta.launch(q, k, v, g, beta, state))
        return y, new_state
    return _gated_delta.reference(q, k, v, g, beta, state)


def gather_mm(x: mx.array, w: mx.array, experts: mx.array, sorted_experts: bool) -> mx.array:
    """x @ w[experts].T for stacked expert weights w (E, out, in); x (..., 1, in) -> (..., 1, out)."""
    if mx.default_device() == mx.cpu and x.dtype != mx.float32:
        # MLX's CPU GatherMM is float32-only: compute there in float32 (CPU is for tests, not speed).
        y = mx.gather_mm(x.astype(mx.float32), w.swapaxes(-1, -2).astype(mx.float32), rhs_indices=experts,
                         sorted_indices=sorted_experts)
        return y.astype(x.dtype)
    return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=experts, sorted_indices=sorted_experts)
