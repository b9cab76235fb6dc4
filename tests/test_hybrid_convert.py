"""`convert` for the hybrid models (qwen3_5 image-text, qwen3_5_moe with the hub's stacked experts, qwen3_next):
the 4-bit output loads in mlx-lm (its own qwen3_5 / qwen3_5_moe / qwen3_next classes and sanitize) with the same
logits as ours on the same file, the tensors that must stay in floating point do (read from the written file's
header, not from our loader), and the MTP head is carried over (quantized like the rest, in a file of its own)
while the vision tower is not.

fp32 compute on both sides over the same 4-bit weights: max abs diff <= 1e-4 (measured 8e-6 .. 1e-5).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import prompt_ids
from safetensors import safe_open

from qwen_mlx.weights.convert import convert
from qwen_mlx.weights.loader import load_model

MLX_LM = ["qwen3_5_default", "qwen3_5_moe_default", "qwen3_next"]  # mlx-lm assumes full_attention_interval
FLOAT = re.compile(r"\.(A_log|dt_bias|conv1d\.weight|[a-z_]*norm\.weight|pre_fc_norm_(embedding|hidden)\.weight"
                   r"|mlp\.gate\.weight|shared_expert_gate\.weight)$")


def header(path: Path) -> dict[str, str]:
    """name -> dtype of every tensor in the converted checkpoint's files, as written."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            out.update((k, f.get_slice(k).get_dtype()) for k in f.keys())
    return out


@pytest.mark.parametrize("variant", MLX_LM)
def test_convert_4bit_loads_in_mlx_lm_with_our_logits_and_keeps_the_float_tensors(hybrid_checkpoint, tmp_path,
                                                                                    variant):
    from mlx_lm.utils import load_model as mlx_lm_load

    src = tmp_path / "src"
    shutil.copytree(hybrid_checkpoint(variant, mtp=True), src)
    from safetensors.numpy import save_file

    save_file({"model.visual.blocks.99.attn.qkv.weight": np.zeros((3, 3), np.int64)}, str(src / "extra.safetensors"))
    out = tmp_path / "out"
    result = convert(src, out, bits=4, progress=False)
    assert result.quantization["bits"] == 4

    dtypes = header(out)
    floats = {k: v for k, v in dtypes.items() if FLOAT.search(k)}
    assert any(k.endswith(".A_log") for k in floats) and any(k.endswith(".conv1d.weight") for k in floats)
    assert all(v in ("F32", "BF16", "F16") for v in floats.values()), floats
    assert not any(k.removesuffix(".weight") + ".scales" in dtypes for k in floats)
    quantized = [k for k in dtypes if k.endswith(".scales")]
    for layer in ("in_proj_qkv" if variant != "qwen3_next" else "in_proj_qkvz", "self_attn.q_proj"):
        assert any(layer in k for k in quantized), layer
    if variant != "qwen3_5_default":
        assert any(".switch_mlp.gate_proj." in k for k in quantized)
    prefix = "model." if variant == "qwen3_next" else "language_model.model."  # mlx-lm's own module paths
    assert all(k.startswith((prefix, "mtp.", "lm_head.", "language_model.lm_head.")) for k in dtypes)
    assert "mtp.fc.scales" in dtypes and "mtp.norm.weight" in floats and not any("visual" in k for k in dtypes)
    with safe_open(str(out / "mtp.safetensors"), "np") as f:  # outside mlx-lm's model*.safetensors
        assert set(f.keys()) == {k for k in dtypes if k.startswith("mtp.")}

    ours, _ = load_model(out)
    theirs = mlx_lm_load(out)[0]
    ids = mx.array(prompt_ids(12))[None]
    a, b = ours(ids), theirs(ids)
    assert a.dtype == b.dtype == mx.float32
    assert mx.abs(a - b).max().item() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]


def test_mixed_recipe_on_an_image_text_moe_loads_in_mlx_lm_with_the_head_at_8_bits(hybrid_checkpoint, tmp_path):
    """A mixed recipe's per-layer keys name mlx-lm's module paths (`language_model.lm_head`), so both engines build
    the head at 8 bits, the rest at 4, and agree."""
    from mlx_lm.utils import load_model as mlx_lm_load

    out = tmp_path / "out"
    result = convert(hybrid_checkpoint("qwen3_5_moe_default"), out, recipe="mixed_4_6", progress=False)
    assert result.quantization["language_model.lm_head"]["bits"] == 8
    ours, _ = load_model(out)
    theirs = mlx_lm_load(out)[0]
    assert ours.lm_head.bits == theirs.language_model.lm_head.bits == 8
    assert ours.layers[0].linear_attn.in_proj_qkv.bits == theirs.language_model.layers[0].linear_attn.in_proj_qkv.bits == 4
    ids = mx.array(prompt_ids(12))[None]
    assert mx.abs(ours(ids) - theirs(ids)).max().item() <= 1e-4
