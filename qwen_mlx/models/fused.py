"""The model's layers with the custom kernels swapped in, and `fuse`, which swaps them into a built model at load.

Each class here is a layer of qwen3.py (or a quantized layer of kernels/quantized.py) whose marked methods call
kernels.ops instead of the page's MLX ops, falling back to the page (`super()`) where a kernel does not cover the
case. The page stays the definition: the kernels are tested against it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.kernels import dialect, ops, router
from qwen_mlx.kernels import rope as rope_kernel
from qwen_mlx.kernels.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedSwitchLinear
from qwen_mlx.models.qwen3 import MLP, Attention, SparseMoE, SwitchLinear, SwitchMLP
from qwen_mlx.models.qwen3_5 import GatedDeltaNet


class FusedAttention(Attention):
    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = ops.linears(x, self.q_proj, self.k_proj, self.v_proj)
        return q, k, v

    def norm_and_rotate(self, q: mx.array, k: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        if not rope_kernel.supports(q, k) or not (isinstance(offset, int) or offset.size == 1):
            return super().norm_and_rotate(q, k, offset)  # (a batched decode step: one offset per sequence)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if "q_norm" in self else None
        return ops.rope(q, k, self._rope.inv_freq, offset=offset, norms=norms)


class FusedMLP(MLP):
    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(ops.swiglu(x, self.gate_proj, self.up_proj))


class FusedSparseMoE(SparseMoE):
    def route(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        if not router.supports(logits, self.top_k):
            return super().route(logits)
        return ops.route(logits, self.top_k, self.norm_topk_prob)


class FusedSwitchMLP(SwitchMLP):
    def activation(self, x: mx.array, experts: mx.array, sorted_experts: bool) -> mx.array:
        if "gate_up_proj" not in self:
            return super().activation(x, experts, sorted_experts)
        return ops.expert_swiglu(x, self.gate_up_proj, experts, sorted_experts)

    def weighted_sum(self, h: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        return ops.expert_sum(h, self.down_proj, experts, weights)


class FusedGatedDeltaNet(GatedDeltaNet):
    def step(self, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
             state: mx.array) -> tuple[mx.array, mx.array]:
        return ops.gated_delta_step(q, k, v, g, beta, state)  # the kernel where it covers the case, else the page's


class FusedQuantizedLinear(QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = ops.qmatmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode)
        return y + self["bias"] if "bias" in self else y


class FusedQuantizedEmbedding(QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return ops.qmatmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                           self.mode)


class FusedQuantizedSwitchLinear(QuantizedSwitchLinear):
    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool = False) -> mx.array:
        return ops.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), experts, self.group_size,
                              self.bits, sorted_experts, self.mode)


class Float32SwitchLinear(SwitchLinear):
    """MLX's CPU GatherMM is float32-only: there the experts' product is computed in float32 (CPU is for tests,
    not speed)."""

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool = False) -> mx.array:
        w = self.weight.swapaxes(-1, -2).astype(mx.float32)
        y = mx.gather_mm(x.astype(mx.float32), w, rhs_indices=experts, sorted_indices=sorted_experts)
        return y.astype(x.dtype)


class CpuGatedDeltaNet(GatedDeltaNet):
    """Prefill's delta rule in chunks of 16 on MLX's CPU backend: there the scan's matmuls cost the same per token
    at any chunk size while the work within a chunk grows with it, so smaller chunks pay (2048 tokens at
    Qwen3.5-35B-A3B's shapes: 16 is 1.5x faster than 64, 32 1.35x; docs/bench.md). GPUs keep 64 (more work per
    launch, fewer steps)."""

    chunk = 16


GPU_FORMS: dict[type, type] = {Attention: FusedAttention, MLP: FusedMLP, SparseMoE: FusedSparseMoE,
                               SwitchMLP: FusedSwitchMLP, GatedDeltaNet: FusedGatedDeltaNet,
                               QuantizedLinear: FusedQuantizedLinear,
                               QuantizedEmbedding: FusedQuantizedEmbedding,
                               QuantizedSwitchLinear: FusedQuantizedSwitchLinear}
CPU_FORMS: dict[type, type] = {SwitchLinear: Float32SwitchLinear, GatedDeltaNet: CpuGatedDeltaNet}
_PLAIN = {form: plain for forms in (GPU_FORMS, CPU_FORMS) for plain, form in forms.items()}


def fuse(model: nn.Module, backend: str) -> None:
    """Give the model's layers, in place, the forms `backend` runs (kernels.ops.choose_backend's answer, taken once
    at load): the fused ones above on "metal" or "cuda"; on "reference" the page's own, except for the CPU's
    float32-only expert product and its delta-rule chunk size. Also makes `backend` the one kernels.ops runs on.
    A layer of a class not named here (a distributed shard) is left as it is; fusing again with another backend
    swaps the forms back."""
    ops.use(backend)
    if backend in dialect.BACKENDS:
        forms = GPU_FORMS
    else:
        forms = CPU_FORMS if mx.default_device() == mx.cpu else {}
    for _, module in model.named_modules():
        plain = _PLAIN.get(type(module), type(module))
        module.__class__ = forms.get(plain, plain)
