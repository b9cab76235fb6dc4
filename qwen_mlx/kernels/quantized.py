"""Quantized layers, held as arrays in mlx-lm's layout: `weight` packed uint32, `scales`, `biases` (mx.quantize's).

Their product is MLX's own (mx.quantized_matmul, mx.gather_qmm). They are classes of their own, not mlx.nn's, so
that ops.py recognises them (isinstance) and may read their matrices to fuse several products into one launch; a
layer of another class (a distributed shard) may compute more than its product and is only ever called.
weights/quant.py swaps them into a model; models/fused.py gives them the custom kernels' product on a GPU.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear: same parameters, product and checkpoint names."""


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding: same parameters, lookup and (tied head) product."""


class QuantizedSwitchLinear(nn.Module):
    """A stack of quantized expert matrices (E, out, in): weight (E, out, in * bits / 32) uint32, scales and biases
    (E, out, in / group_size); each token goes through the experts it is routed to."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                 mode: str):
        super().__init__()
        self.weight, self.scales = weight, scales
        if biases is not None:
            self.biases = biases
        self.group_size, self.bits, self.mode = group_size, bits, mode

    @classmethod
    def from_weight(cls, weight: mx.array, group_size: int, bits: int, mode: str) -> QuantizedSwitchLinear:
        """The stack (E, out, in) quantized by mx.quantize."""
        weight, scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        return cls(weight, scales, biases[0] if biases else None, group_size, bits, mode)

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool = False) -> mx.array:
        # x: (..., 1 or k, 1, in), experts: (..., k) -> (..., k, 1, out)
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=experts,
                             transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_experts)
