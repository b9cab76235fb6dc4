"""Quantized layers (swapped in by quant.py) against mlx-lm's quantized model holding the same packed weights."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import greedy_ours, prompt_ids
from mlx.utils import tree_flatten

from qwen_mlx.kernels.quantized import QuantizedSwitchLinear
from qwen_mlx.models.qwen3 import checkpoint_weights
from qwen_mlx.weights.loader import load_model
from qwen_mlx.weights.quant import layer_settings, quantize_model


def mlx_lm_quantized_twin(path, params: dict, group_size: int, bits: int):
    """mlx-lm's model holding our quantized weights, in its layout (experts' gate and up apart)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    twin, _ = mlx_lm_load(path)
    weights = checkpoint_weights(params)
    nn.quantize(twin, group_size=group_size, bits=bits,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights)
    twin.load_weights(list(weights.items()), strict=True)
    return twin


@pytest.mark.parametrize("variant,bits,group_size", [("qwen3", 4, 64), ("qwen3_moe", 4, 32), ("qwen3_moe", 8, 64),
                                                      ("qwen2", 8, 32)])
def test_quantized_model_equals_mlx_lm_on_the_same_weights(tiny_checkpoint, variant, bits, group_size):
    path = tiny_checkpoint(variant)
    model, _ = load_model(path)
    full = np.array(model(mx.array(prompt_ids(24))[None]))
    quantize_model(model, {"group_size": group_size, "bits": bits})
    params = dict(tree_flatten(model.parameters()))
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    if variant == "qwen3_moe":
        assert isinstance(model.layers[0].mlp.switch_mlp.gate_up_proj, QuantizedSwitchLinear)
        # down_proj's input (moe_intermediate_size 32) is not a multiple of group 64: it stays unquantized
        down = params["model.layers.0.mlp.switch_mlp.down_proj.weight"].dtype
        assert down == (mx.uint32 if 32 % group_size == 0 else mx.float32)
    twin = mlx_lm_quantized_twin(path, params, group_size, bits)
    ids = mx.array(prompt_ids(24))[None]
    ours, theirs = np.array(model(ids)), np.array(twin(ids))
    assert np.abs(ours - theirs).max() <= 1e-4
    # and quantization did change the numbers, by about what the bit width allows
    err = np.abs(ours - full).max() / np.abs(full).max()
    assert (1e-4 if bits == 8 else 1e-3) < err < (0.1 if bits == 8 else 1.0)
    # greedy decode through the quantized decode path (single-token gather_qmm for the experts)
    from helpers import greedy_mlx_lm_model

    assert greedy_ours(model, prompt_ids(8, seed=9), 16) == greedy_mlx_lm_model(twin, prompt_ids(8, seed=9), 16)


def test_per_layer_overrides():
    q = {"group_size": 64, "bits": 4, "model.layers.0.mlp.down_proj": {"bits": 8},
         "lm_head": False}
    assert layer_settings(q, "model.layers.0.mlp.down_proj") == (64, 8, "affine")
    assert layer_settings(q, "model.layers.0.mlp.up_proj") == (64, 4, "affine")
    assert layer_settings(q, "lm_head") is None
