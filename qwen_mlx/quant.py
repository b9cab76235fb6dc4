"""Quantized layers swapped into a Model from outside (the model itself knows nothing of quantization).

The layout is mlx-lm's: `<layer>.weight` packed uint32, `<layer>.scales`, `<layer>.biases`, and config.json's
"quantization" section {"group_size", "bits", "mode"} with per-layer overrides keyed by the layer path
(a dict of its own settings, or false for a layer left unquantized).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .model import SwitchLinear


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with quantized expert weights: (E, out, in * bits / 32) uint32 plus per-group scales/biases."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                 mode: str):
        super().__init__()
        self.weight, self.scales = weight, scales
        if biases is not None:
            self.biases = biases
        self.group_size, self.bits, self.mode = group_size, bits, mode

    @classmethod
    def from_switch(cls, layer: SwitchLinear, group_size: int, bits: int, mode: str) -> "QuantizedSwitchLinear":
        weight, scales, *biases = mx.quantize(layer.weight, group_size, bits, mode=mode)
        return cls(weight, scales, biases[0] if biases else None, group_size, bits, mode)

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool = False) -> mx.array:
        return mx.gather_qmm(
            x, self.weight, self.scales, self.get("biases"), rhs_indices=experts, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_experts,
        )


def layer_settings(quantization: dict, path: str) -> tuple[int, int, str] | None:
    """(group_size, bits, mode) for the layer at `path`, or None when that layer stays unquantized."""
    override = quantization.get(path, True)
    if override is False:
        return None
    settings = {**quantization, **override} if isinstance(override, dict) else quantization
    return settings["group_size"], settings["bits"], settings.get("mode", "affine")


def quantize_model(model: nn.Module, quantization: dict, present: set[str] | None = None) -> None:
    """Replace the linear, embedding and expert layers by quantized ones, in place.

    With `present` (the tensor names of a checkpoint being loaded), only layers whose `.scales` the checkpoint has
    are swapped, so the shapes then checked against the files are the quantized ones.
    """
    swaps = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding, SwitchLinear)):
            continue
        if present is not None and f"{path}.scales" not in present:
            continue
        settings = layer_settings(quantization, path)
        if settings is None or module.weight.shape[-1] % settings[0]:
            continue
        group_size, bits, mode = settings
        if isinstance(module, SwitchLinear):
            swaps.append((path, QuantizedSwitchLinear.from_switch(module, group_size, bits, mode)))
        elif isinstance(module, nn.Embedding):
            swaps.append((path, nn.QuantizedEmbedding.from_embedding(module, group_size, bits, mode=mode)))
        else:
            swaps.append((path, nn.QuantizedLinear.from_linear(module, group_size, bits, mode=mode)))
    model.update_modules(tree_unflatten(swaps))
