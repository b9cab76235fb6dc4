"""The experts' joined gate+up stack (one gather for both) and weighted sum against mlx-lm's SwitchGLU, which
gathers gate and up apart, holding the same weights: float and quantized, decode (each token's experts) and
prefill (sorted by expert), and a layer whose gate and up are quantized differently (held apart)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen_mlx.kernels.quantized import QuantizedSwitchLinear
from qwen_mlx.models.qwen3 import SwitchMLP, checkpoint_weights
from qwen_mlx.weights.quant import quantize_model

DIM, HIDDEN, EXPERTS, TOP_K = 128, 64, 8, 2


class Layer(nn.Module):
    """Holds a SwitchMLP under the name it has in a checkpoint."""

    def __init__(self):
        super().__init__()
        self.switch_mlp = SwitchMLP(DIM, HIDDEN, EXPERTS)


def twin_of(layer: Layer, settings: dict[str, tuple[int, int]] | None = None):
    """mlx-lm's SwitchGLU holding `layer`'s weights in the checkpoint layout (gate and up apart), its projections
    quantized with `settings` (projection -> (group size, bits))."""
    from mlx_lm.models.switch_layers import SwitchGLU

    weights = {k.removeprefix("switch_mlp."): v
               for k, v in checkpoint_weights(dict(tree_flatten(layer.parameters()))).items()}
    twin = SwitchGLU(DIM, HIDDEN, EXPERTS)
    if settings:
        nn.quantize(twin, class_predicate=lambda p, m: p in settings and dict(zip(("group_size", "bits"),
                                                                                   settings[p])))
    twin.load_weights(list(weights.items()), strict=True)
    return twin


def inputs(tokens: int, seed: int) -> tuple[mx.array, mx.array, mx.array]:
    """x (1, tokens, DIM), distinct top-k experts per token (1, tokens, TOP_K) and their weights (1, tokens, TOP_K)."""
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(tokens)])
    weights = rng.uniform(0.1, 1.0, (1, tokens, TOP_K)).astype(np.float32)
    return (mx.array(rng.standard_normal((1, tokens, DIM)).astype(np.float32)), mx.array(experts[None]),
            mx.array(weights))


def weighted(twin, x: mx.array, experts: mx.array, weights: mx.array) -> np.ndarray:
    """mlx-lm's SwitchGLU per (token, expert) (1, T, k, DIM), weighted and added over the experts as its MoE
    blocks do -> (1, T, DIM)."""
    return np.array((twin(x, experts) * weights[..., None]).sum(axis=-2))


@pytest.mark.parametrize("tokens", [1, 48], ids=["decode", "sorted-prefill"])  # 48 * 2 pairs: the sorted path
@pytest.mark.parametrize("bits", [None, 4, 8], ids=["float", "4bit", "8bit"])
def test_joined_gate_up_equals_two_gathers(tokens, bits):
    mx.random.seed(tokens)
    layer = Layer()
    if bits:
        up = layer.switch_mlp.gate_up_proj.weight[:, HIDDEN:]  # (E, HIDDEN, DIM), float
        quantize_model(layer, {"group_size": 32, "bits": bits})
        assert isinstance(layer.switch_mlp.gate_up_proj, QuantizedSwitchLinear)
        # quantization groups run along the input: the joined stack's packing is gate's then up's, to the bit
        params = checkpoint_weights(dict(tree_flatten(layer.parameters())))
        for part, value in zip(("weight", "scales", "biases"), mx.quantize(up, 32, bits)):
            assert mx.array_equal(params[f"switch_mlp.up_proj.{part}"], value)
    twin = twin_of(layer, {p: (32, bits) for p in ("gate_proj", "up_proj", "down_proj")} if bits else None)
    x, experts, weights = inputs(tokens, seed=tokens)
    ours, theirs = np.array(layer.switch_mlp(x, experts, weights)), weighted(twin, x, experts, weights)
    assert ours.shape == (1, tokens, DIM)
    assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max())


@pytest.mark.parametrize("tokens", [1, 48], ids=["decode", "sorted-prefill"])
def test_gate_and_up_quantized_differently_are_held_apart(tokens):
    """mlx-lm's sensitivity-based mixed quantization may give gate and up of one layer different bits."""
    mx.random.seed(0)
    layer = Layer()
    quantize_model(layer, {"group_size": 32, "bits": 4, "switch_mlp.gate_proj": {"group_size": 64, "bits": 8}})
    mlp = layer.switch_mlp
    assert "gate_up_proj" not in mlp
    assert (mlp.gate_proj.bits, mlp.gate_proj.group_size, mlp.up_proj.bits, mlp.up_proj.group_size) == (8, 64, 4, 32)
    twin = twin_of(layer, {"gate_proj": (64, 8), "up_proj": (32, 4), "down_proj": (32, 4)})
    x, experts, weights = inputs(tokens, seed=5)
    ours, theirs = np.array(mlp(x, experts, weights)), weighted(twin, x, experts, weights)
    assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max())
