"""Quantized hybrid checkpoints as mlx-community publishes them: mlx-lm's own `convert` (4 bits, its default group
64, its 8-bit router and shared-expert gate, the layers whose input 64 does not divide left in float) run on our
tiny qwen3_5 and qwen3_5_moe checkpoints (default layer pattern: mlx-lm assumes full_attention_interval), then
loaded by our loader and by mlx-lm. Nothing needed mapping beyond what weights/names.py already does (mlx-lm's
`language_model.model.*` names and its `switch_mlp` experts, per-layer overrides under mlx-lm's module paths).

Tolerance: both sides compute in float32 over the same 4-bit weights (a bfloat16 file is upcast on both sides):
max abs diff <= 1e-4 on logits spanning about +-11 (measured 1.6e-5 .. 3.2e-5). Computing in bfloat16 instead,
each side is about 2.2 .. 2.5 away from the float32 result on these random weights and the two sides 0.7 from each
other: that is bfloat16 rounding, not layout, so it is not the comparison made here. (mlx-lm's MoE cannot run
bfloat16 on the CPU at all: "[GatherMM::eval] Currently only supports float32"; ours can, checked below.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from helpers import greedy_mlx_lm_model, greedy_ours, prompt_ids
from safetensors import safe_open

from qwen_mlx.weights.loader import load_model


@pytest.fixture(scope="module")
def mlx_lm_q4(hybrid_checkpoint, tmp_path_factory):
    """mlx_lm_q4(variant, dtype) -> the directory mlx_lm.convert(quantize=True, q_bits=4) wrote, once each."""
    from mlx_lm import convert

    made = {}

    def get(variant: str, dtype: str):
        if (variant, dtype) not in made:
            out = tmp_path_factory.mktemp(f"mlx_lm_q4_{variant}_{dtype}") / "model"
            convert(str(hybrid_checkpoint(variant)), str(out), quantize=True, q_bits=4, dtype=dtype)
            made[variant, dtype] = out
        return made[variant, dtype]

    return get


def dtypes(path) -> dict[str, str]:
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize(("variant", "dtype"), [("qwen3_5_default", "float32"),
                                               pytest.param("qwen3_5_moe_default", "bfloat16", marks=pytest.mark.slow)])
def test_mlx_lm_4bit_files_load_with_mlx_lms_logits(mlx_lm_q4, variant, dtype):
    """A float32 dense file, and a MoE file in bfloat16 as mlx-community publishes them (which ours also runs in
    bfloat16 on the CPU, within bfloat16's reach of the float32 result: the argmax agrees on most positions)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    path = mlx_lm_q4(variant, dtype)
    quant = json.loads((path / "config.json").read_text())["quantization"]
    names = dtypes(path)
    assert quant["bits"] == 4 and quant["group_size"] == 64
    assert any(k.endswith("linear_attn.in_proj_qkv.scales") for k in names)  # the file really is quantized
    assert all(names[k] != "U32" for k in names if k.endswith((".A_log", ".conv1d.weight", "norm.weight")))
    if "moe" in variant:  # mlx-lm's recipe: routers and shared-expert gates at 8 bits, recorded per layer
        assert {v["bits"] for k, v in quant.items() if isinstance(v, dict)} == {8}
        assert any(k.endswith("mlp.gate") for k in quant)
    ours = load_model(path, dtype=mx.float32)[0]
    theirs = mlx_lm_load(path)[0]
    theirs.set_dtype(mx.float32)
    ids = prompt_ids(40, seed=4)
    a = np.array(ours(mx.array(ids)[None])[0])
    b = np.array(theirs(mx.array(ids)[None])[0])
    assert np.abs(b).max() > 8 and np.abs(a - b).max() <= 1e-4
    assert greedy_ours(ours, ids[:12], 8) == greedy_mlx_lm_model(theirs, ids[:12], 8)
    if dtype == "bfloat16":
        half = np.array(load_model(path)[0](mx.array(ids)[None])[0].astype(mx.float32))
        assert np.isfinite(half).all() and (half.argmax(-1) == a.argmax(-1)).mean() >= 0.8


def test_info_on_an_mlx_lm_moe_file(mlx_lm_q4, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(mlx_lm_q4("qwen3_5_moe_default", "bfloat16"), path)
    out = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "info", "--model", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "qwen3_5_moe: 4 layers" in out.stdout and "3 linear attention" in out.stdout
    # The tiny model has 4 MoE layers, each with a router and a shared-expert gate at 8 bits.
    assert "4-bit group 64; 8 layers 8-bit group 64" in out.stdout
