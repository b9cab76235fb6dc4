import math

import mlx.core as mx
import numpy as np
import pytest
from make_tiny_checkpoint import VARIANTS

from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.qwen3 import Attention
from qwen_mlx.models.rope import cos_sin, make_rope, rotate_reference


def yarn_config(**scaling):
    return ModelConfig.from_dict({**VARIANTS["qwen3_yarn"], "vocab_size": 100,
                                  "rope_scaling": {"rope_type": "yarn", **scaling}})


@pytest.mark.parametrize("scaling", [
    {"factor": 4.0, "original_max_position_embeddings": 64},
    {"factor": 2.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
    {"factor": 8.0, "original_max_position_embeddings": 32768, "attention_factor": 1.3},
])
def test_yarn_equals_transformers(scaling):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = yarn_config(**scaling)
    hf = Qwen3Config(**{**VARIANTS["qwen3_yarn"], "vocab_size": 100,
                        "rope_scaling": {"rope_type": "yarn", **scaling}})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    rope = make_rope(cfg)
    np.testing.assert_allclose(np.array(rope.inv_freq), inv_freq.numpy(), rtol=1e-6)
    assert rope.attention_factor == pytest.approx(attention_factor)
    assert scaling.get("attention_factor", 0.1 * math.log(scaling["factor"]) + 1) == pytest.approx(attention_factor)


def test_model_rope_equals_split_half_definition():
    """The model page's RoPE (Attention.rotate, mx.fast.rope with YaRN's wavelengths) against cos/sin written out."""
    cfg = yarn_config(factor=4.0, original_max_position_embeddings=64)
    rope = make_rope(cfg)
    attention = Attention(cfg, rope)
    x = mx.random.normal((2, 3, 7, cfg.head_dim), key=mx.random.key(0))  # (B, heads, L, head_dim)
    for offset in (0, 5, 300):
        cos, sin = cos_sin(rope, offset, 7)
        assert mx.abs(attention.rotate(x, offset) - rotate_reference(x, cos, sin)).max().item() < 1e-4
    # the rotation is the split-half (NeoX) one, not the interleaved one
    interleaved = mx.fast.rope(x, cfg.head_dim, traditional=True, base=None, scale=1.0, offset=5,
                               freqs=rope.wavelengths)
    assert mx.abs(interleaved - attention.rotate(x, 5)).max().item() > 0.1
