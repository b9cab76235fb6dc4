"""The backend, chosen once at load, and one function per custom-kernel op.

`choose_backend()` is "metal" on an Apple GPU, "cuda" on an NVIDIA GPU (MLX's CUDA build) and "reference"
elsewhere; the environment variable QWEN_MLX_KERNELS=reference|custom overrides the choice ("custom" insists on a
GPU). The loader calls it once per model and hands the answer to models.fused.fuse, which records it here (`use`)
and, on "metal" or "cuda", swaps in the layer forms that call these ops; on "reference" the model runs its own
page of MLX ops and nothing here is called.

The ops run our kernels (qmatmul.py, projections.py, gather_qmv.py, router.py, rope.py, gated_delta.py, one source
built for both) where they cover the case. `qmatmul`, `gather_qmm`, `linears`, `swiglu`, `expert_swiglu` and
`expert_sum` fall back to MLX's op or the layers' own call elsewhere, `gated_delta_step` to gated_delta.reference;
`route` and `rope` are the kernel alone (their callers check `router.supports` / `rope.supports` and keep the
model's own math otherwise).

The fused ops take quantized layers (quantized.py): they fuse only layers of those classes, whose product is
`qmatmul`/`gather_qmm` of their own arrays, and otherwise call the layers, so that a layer swapped in from elsewhere
(a distributed shard) keeps its own product.
"""

import os

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.errors import UserError
from qwen_mlx.kernels import dialect, gated_delta, gather_qmv, projections, router
from qwen_mlx.kernels import qmatmul as qmatmul_kernel
from qwen_mlx.kernels import rope as rope_kernel
from qwen_mlx.kernels.quantized import QuantizedLinear, QuantizedSwitchLinear

ENV = "QWEN_MLX_KERNELS"
CHOICES = ("reference", "custom")
BACKEND = "reference"  # what the ops run on: set once at load (use), never read from the environment per op


def gpu_backend() -> str | None:
    """"metal" or "cuda" when MLX computes on that GPU by default, else None."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def choose_backend() -> str:
    """Which implementation a model loaded now uses: "metal", "cuda" or "reference" (MLX ops). Reads the
    environment and the device: call it once per load, not per op."""
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


def use(backend: str) -> None:
    """Run the ops on `backend` from now on ("metal", "cuda" or "reference")."""
    global BACKEND
    if backend not in ("reference", *dialect.BACKENDS):
        raise ValueError(f"unknown kernels backend {backend!r}")
    BACKEND = backend


def qmatmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
            mode: str = "affine") -> mx.array:
    """x (..., K) @ W.T -> (..., N) for W (N, K) quantized by mx.quantize (w packed uint32, scales, biases)."""
    if BACKEND != "reference" and qmatmul_kernel.dispatched(x, BACKEND) \
            and qmatmul_kernel.supports(x, w, biases, group_size, bits, mode):
        return dialect.run(qmatmul_kernel.KERNEL, BACKEND,
                           qmatmul_kernel.launch(x, w, scales, biases, group_size, bits))[0]
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


def gather_qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, experts: mx.array,
               group_size: int, bits: int, sorted_experts: bool, mode: str = "affine") -> mx.array:
    """x (..., 1 or k, 1, K) @ W[experts].T -> (..., k, 1, N) for stacked expert weights W (E, N, K) quantized by
    mx.quantize, experts (..., k); mx.gather_qmm's broadcasting. The decode sizes run our kernel on a GPU."""
    if BACKEND != "reference" and gather_qmv.supports(x, w, biases, experts, group_size, bits, mode):
        return dialect.run(gather_qmv.KERNEL, BACKEND,
                           gather_qmv.launch(x, w, scales, biases, experts, group_size, bits))[0]
    return mx.gather_qmm(x, w, scales, biases, rhs_indices=experts, transpose=True, group_size=group_size, bits=bits,
                         mode=mode, sorted_indices=sorted_experts)


def _quantized_alike(layers) -> tuple[int, int] | None:
    """(group_size, bits) when every layer is one of ours, affine-quantized with those same settings; else None."""
    first = layers[0]
    if not all(isinstance(layer, (QuantizedLinear, QuantizedSwitchLinear)) and layer.mode == "affine"
               and "biases" in layer and (layer.group_size, layer.bits) == (first.group_size, first.bits)
               for layer in layers):
        return None
    return first.group_size, first.bits


def _matrix(layer: nn.Module) -> tuple[mx.array, mx.array, mx.array]:
    return layer["weight"], layer["scales"], layer["biases"]


def linears(x: mx.array, *layers: nn.Module) -> list[mx.array]:
    """[layer(x) for layer in layers] for 2 or 3 linear layers of one input (Q, K and V); one launch on a GPU when
    they are our quantized layers with one quantization."""
    alike = _quantized_alike(layers)
    if BACKEND != "reference" and alike and qmatmul_kernel.dispatched(x, BACKEND):
        matrices = [_matrix(layer) for layer in layers]
        if projections.supports(x, matrices, *alike):
            ys = dialect.run(projections.parts_kernel(len(layers)), BACKEND,
                             projections.launch_parts(x, matrices, *alike))
            return [y + layer["bias"] if "bias" in layer else y for y, layer in zip(ys, layers)]
    return [layer(x) for layer in layers]


def swiglu(x: mx.array, gate: nn.Module, up: nn.Module) -> mx.array:
    """silu(gate(x)) * up(x) (the MLP's activation); one launch on a GPU when gate and up are our quantized layers
    with one quantization and no bias."""
    alike = _quantized_alike((gate, up))
    if BACKEND != "reference" and alike and "bias" not in gate and "bias" not in up \
            and qmatmul_kernel.dispatched(x, BACKEND):
        matrices = [_matrix(gate), _matrix(up)]
        if gate["weight"].shape == up["weight"].shape and projections.supports(x, matrices, *alike):
            return dialect.run(projections.SWIGLU_KERNEL, BACKEND, projections.launch_swiglu(x, *matrices, *alike))[0]
    return nn.silu(gate(x)) * up(x)


def expert_swiglu(x: mx.array, gate_up: nn.Module, experts: mx.array, sorted_experts: bool) -> mx.array:
    """silu(g) * u for [g, u] = gate_up(x, experts) split in halves (the experts' joined gate/up stack, gate rows
    first): x (..., 1 or k, 1, dim) -> (..., k, 1, hidden). One launch on a GPU at decode sizes."""
    alike = _quantized_alike((gate_up,))
    if BACKEND != "reference" and alike:
        w, scales, biases = _matrix(gate_up)
        if w.shape[1] % 2 == 0 and gather_qmv.supports(x, w, biases, experts, *alike, "affine"):
            return dialect.run(gather_qmv.SWIGLU_KERNEL, BACKEND,
                               gather_qmv.launch_swiglu(x, w, scales, biases, experts, *alike))[0]
    gate, up = mx.split(gate_up(x, experts, sorted_experts), 2, axis=-1)
    return nn.silu(gate) * up


def expert_sum(h: mx.array, down: nn.Module, experts: mx.array, weights: mx.array) -> mx.array:
    """The routed experts' down projections weighted and added: sum over j of weights[..., j] *
    down(h[..., j, :, :], experts[..., j]) for h (..., k, 1, hidden), experts and weights (..., k) -> (..., dim).
    One launch on a GPU at decode sizes (the k products are added in registers)."""
    alike = _quantized_alike((down,))
    if BACKEND != "reference" and alike and gather_qmv.sums(h, experts, weights):
        w, scales, biases = _matrix(down)
        if gather_qmv.supports(h, w, biases, experts, *alike, "affine"):
            return dialect.run(gather_qmv.SUM_KERNEL, BACKEND,
                               gather_qmv.launch_sum(h, w, scales, biases, experts, weights, *alike))[0]
    y = down(h, experts).squeeze(-2)  # (..., k, dim)
    return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def route(logits: mx.array, top_k: int, norm_topk_prob: bool) -> tuple[mx.array, mx.array]:
    """The MoE router after its matmul, in one launch on BACKEND (a GPU; `router.supports(logits, top_k)`):
    logits (..., E) -> the top-k experts of each token (..., k) uint32 and their softmax probabilities (..., k)
    float32, renormalized to sum to 1 when `norm_topk_prob`."""
    experts, weights = dialect.run(router.KERNEL, BACKEND, router.launch(logits, top_k, norm_topk_prob))
    return experts, weights


def rope(q: mx.array, k: mx.array, inv_freq: mx.array, *, offset: int | mx.array,
         norms: tuple[mx.array, mx.array, float] | None = None) -> tuple[mx.array, mx.array]:
    """RoPE (NeoX split-half) on q (B, L, Hq, D) and k (B, L, Hk, D) at positions offset .. offset + L - 1, after a
    per-head RMSNorm when `norms` = (q weight, k weight, eps) is given -> (B, Hq, L, D), (B, Hk, L, D); the angle of
    pair i is position * inv_freq[i]; offset an int or an array of one. One launch on BACKEND (a GPU;
    `rope.supports(q, k)`)."""
    q, k = dialect.run(rope_kernel.KERNEL, BACKEND, rope_kernel.launch(q, k, inv_freq, offset, norms))
    return q, k


def gated_delta_step(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                     state: mx.array) -> tuple[mx.array, mx.array]:
    """One decode token of the gated delta rule (kernels/gated_delta.py has the math): q, k (B, Hk, Dk)
    L2-normalised, q scaled by Dk**-0.5; v (B, Hv, Dv); g (B, Hv) log-decay; beta (B, Hv); state (B, Hv, Dk, Dv)
    float32 -> y (B, Hv, Dv) in v's dtype, the new state float32. One launch on a GPU."""
    if BACKEND != "reference" and gated_delta.supports(q, k, v, g, beta, state):
        y, new_state = dialect.run(gated_delta.KERNEL, BACKEND, gated_delta.launch(q, k, v, g, beta, state))
        return y, new_state
    return gated_delta.reference(q, k, v, g, beta, state)
