"""qwen-mlx convert: checkpoints that qwen-mlx and mlx-lm both load with the same logits, mlx-lm's own conversions,
mixed-precision recipes, streaming memory, and outputs that appear complete or not at all (issue 7).

Figures printed with -s (the tiny random checkpoints, fp32 source, 48 random prompt tokens); see docs/convert.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import prompt_ids

from qwen_mlx.errors import UserError
from qwen_mlx.weights.convert import convert
from qwen_mlx.weights.loader import load_model, read_index
from qwen_mlx.weights.names import LoadError
from qwen_mlx.weights.quant import layer_settings, logit_agreement


def ours(path, ids: np.ndarray) -> np.ndarray:
    return np.array(load_model(path)[0](mx.array(ids)[None])[0])


def mlx_lm(path, ids: np.ndarray) -> np.ndarray:
    from mlx_lm.utils import load_model as mlx_lm_load

    return np.array(mlx_lm_load(Path(path))[0](mx.array(ids)[None])[0])


# (variant, overrides, bits, group size): 4 and 8 bits, each with groups 32, 64 and 128, spread over the variants:
# qwen3 (hidden 128 where the group is 128, so that its layers have whole groups), the MoE with its experts'
# down_proj left unquantized (group 64 > its 32 inputs) and fully quantized (group 32), qwen2 (QKV bias, untied
# head, a two-shard source).
CASES = [("qwen3", {}, 4, 32), ("qwen3", {}, 8, 64),
         *(pytest.param(*case, marks=pytest.mark.slow)  # 1.5-2.3 s each: CI runs them
           for case in [("qwen3", {"hidden_size": 128}, 4, 128), ("qwen3", {"hidden_size": 128}, 8, 128)]),
         ("qwen3_moe", {}, 4, 64), ("qwen3_moe", {}, 8, 32), ("qwen2", {}, 8, 32)]


@pytest.mark.parametrize("variant,overrides,bits,group_size", CASES)
def test_converted_checkpoint_loads_in_qwen_mlx_and_mlx_lm_with_the_same_logits(tiny_checkpoint, tmp_path, variant,
                                                                                overrides, bits, group_size):
    src = tiny_checkpoint(variant, **overrides)
    result = convert(src, tmp_path / "out", bits=bits, group_size=group_size, progress=False)
    out = result.path
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == result.quantization
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group_size
    index = read_index(out)
    quantized = {name.removesuffix(".scales") for name in index if name.endswith(".scales")}
    assert "model.layers.0.self_attn.q_proj" in quantized
    for layer, setting in config["quantization"].items():
        if setting is False:
            assert layer not in quantized  # left unquantized because its inputs are not whole groups
    if variant == "qwen3_moe":
        assert ("model.layers.0.mlp.switch_mlp.down_proj" in quantized) == (group_size == 32)
        assert layer_settings(config["quantization"], "model.layers.0.mlp.gate")[1] == 8  # the router, as in mlx-lm
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / f).is_file()

    ids = prompt_ids(16)
    a, b = ours(out, ids), mlx_lm(out, ids)
    assert np.abs(a - b).max() <= 1e-4
    source = ours(src, ids)
    err = np.abs(a - source).max() / np.abs(source).max()
    assert (1e-5 if bits == 8 else 1e-3) < err < (0.1 if bits == 8 else 1.0)  # quantized, by about what bits allow


@pytest.fixture(scope="module")
def mlx_lm_converted(tiny_checkpoint, tmp_path_factory):
    """mlx_lm.convert's own 4-bit checkpoints of the tiny qwen3 (group 64) and qwen3_moe (group 32)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    made = {}
    for variant, group_size in (("qwen3", 64), ("qwen3_moe", 32)):
        out = tmp_path_factory.mktemp("mlx-lm") / variant
        mlx_lm_convert(str(tiny_checkpoint(variant)), mlx_path=str(out), quantize=True, q_bits=4,
                       q_group_size=group_size)
        made[variant] = (out, group_size)
    return made


@pytest.mark.parametrize("variant", ["qwen3", "qwen3_moe"])
def test_mlx_lm_convert_output_loads_with_mlx_lm_logits(mlx_lm_converted, variant):
    path, _ = mlx_lm_converted[variant]
    ids = prompt_ids(16)
    assert np.abs(ours(path, ids) - mlx_lm(path, ids)).max() <= 1e-4


@pytest.mark.parametrize("variant", ["qwen3", "qwen3_moe"])
def test_requantize_copies_packing_and_dequantize_restores_floats(mlx_lm_converted, tmp_path, variant):
    path, group_size = mlx_lm_converted[variant]
    same = convert(path, tmp_path / "same", bits=4, group_size=group_size, progress=False).path
    theirs, again = dict(mx.load(str(path / "model.safetensors"))), dict(mx.load(str(same / "model.safetensors")))
    assert sorted(theirs) == sorted(again)
    for name, value in theirs.items():  # the same settings: mlx-lm's packed weights copied bit for bit
        assert mx.array_equal(value, again[name]), name

    floats = convert(path, tmp_path / "floats", dequantize=True, dtype="fp32", progress=False).path
    config = json.loads((floats / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert all(info.dtype == "F32" for info in read_index(floats).values())
    ids = prompt_ids(16)
    assert np.abs(ours(floats, ids) - ours(path, ids)).max() <= 1e-4


def test_mlx_lm_checkpoint_with_gate_and_up_quantized_apart(tiny_checkpoint, tmp_path):
    """mlx-lm's per-layer quantization (its sensitivity-based dynamic quant, say) may give one layer's expert gate
    and up different bits: we hold that layer's gate and up apart, the other layers joined, with mlx-lm's logits;
    and our convert of it writes mlx-lm's layout again."""
    from mlx_lm.convert import convert as mlx_lm_convert

    src = tmp_path / "mixed"
    mlx_lm_convert(str(tiny_checkpoint("qwen3_moe")), mlx_path=str(src), quantize=True, q_bits=4, q_group_size=32,
                   quant_predicate=lambda path, module, *_: {"group_size": 64, "bits": 8}
                   if path == "model.layers.0.mlp.switch_mlp.gate_proj" else True)
    experts = [layer.mlp.switch_mlp for layer in load_model(src)[0].layers if "switch_mlp" in layer.mlp]
    assert "gate_up_proj" not in experts[0] and all("gate_up_proj" in m for m in experts[1:])
    ids = prompt_ids(16)
    assert np.abs(ours(src, ids) - mlx_lm(src, ids)).max() <= 1e-4

    out = convert(src, tmp_path / "again", bits=4, group_size=32, progress=False).path
    assert sorted(read_index(out)) == sorted(read_index(src))
    assert np.abs(ours(out, ids) - mlx_lm(out, ids)).max() <= 1e-4


@pytest.mark.parametrize("variant,group_size", [("qwen3", 64), pytest.param("qwen3_moe", 32, marks=pytest.mark.slow)])
def test_mixed_recipe_beats_uniform_4_bit(tiny_checkpoint, tmp_path, variant, group_size):
    """mixed_4_6 (down_proj 6-bit, embeddings/head 8-bit) against uniform 4-bit at the same group size."""
    ids = prompt_ids(48)
    src = tiny_checkpoint(variant)
    source = load_model(src)[0](mx.array(ids)[None])
    figures = {}
    for name, kwargs in (("uniform 4-bit", {"bits": 4}), ("mixed_4_6", {"recipe": "mixed_4_6"})):
        result = convert(src, tmp_path / f"{variant}-{name}", group_size=group_size, progress=False, **kwargs)
        m = logit_agreement(source, load_model(result.path)[0](mx.array(ids)[None]))
        figures[name] = (m["kl_mean"], m["top1"], result.total_bytes)
    (kl4, top4, size4), (klm, topm, sizem) = figures["uniform 4-bit"], figures["mixed_4_6"]
    print(f"\n{variant} g{group_size}: uniform 4-bit KL {kl4:.4f} top-1 {top4:.1%} {size4 / 2**20:.2f} MiB; "
          f"mixed_4_6 KL {klm:.4f} top-1 {topm:.1%} {sizem / 2**20:.2f} MiB (x{sizem / size4:.2f} size)")
    assert klm < 0.6 * kl4 and topm >= top4
    # the size cost: the 8-bit embedding is most of these tiny models (151,936 x 64); see docs/convert.md
    assert sizem < 1.8 * size4


def test_convert_streams_one_tensor_at_a_time(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3", num_hidden_layers=8, hidden_size=256, intermediate_size=1024, head_dim=64,
                          vocab_size=4096)
    source_bytes = sum((src / f).stat().st_size for f in ("model.safetensors",))
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    convert(src, tmp_path / "out", progress=False)
    peak = mx.get_peak_memory() - base
    print(f"\nconvert peak memory {peak / 2**20:.1f} MiB for a {source_bytes / 2**20:.1f} MiB fp32 source "
          f"(largest tensor {1024 * 256 * 4 / 2**20:.1f} MiB)")
    assert peak < 0.25 * source_bytes


def test_shards_and_recipe_settings_are_checked(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3")
    out = convert(src, tmp_path / "sharded", shard_size=2 * 2**20, progress=False).path
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    # every shard is within the limit unless it holds one tensor that is bigger
    for shard in shards:
        names = [n for n, s in weight_map.items() if s == shard]
        assert (out / shard).stat().st_size <= 2 * 2**20 + 4096 or len(names) == 1
    with pytest.raises(UserError, match="recipe mixed_4_6 quantizes to 4 bits"):
        convert(src, tmp_path / "x", bits=8, recipe="mixed_4_6", progress=False)
    with pytest.raises(UserError, match="mxfp4 takes bits 4 and group size 32"):
        convert(src, tmp_path / "x", mode="mxfp4", group_size=64, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_microscaling_modes_load_in_both(tiny_checkpoint, tmp_path, mode):
    out = convert(tiny_checkpoint("qwen3_moe"), tmp_path / mode, mode=mode, progress=False).path
    ids = prompt_ids(8)
    assert np.abs(ours(out, ids) - mlx_lm(out, ids)).max() <= 1e-4


# --- faults and errors, through the real CLI -----------------------------------------------------------------

# Runs the real CLI, SIGKILLing itself at a chosen point: after the n-th shard is fsynced and closed, or once
# every file is written and synced but before the rename.
KILLER = """
import os, signal, sys
import qwen_mlx.weights.convert as c
point, n = sys.argv[1], int(sys.argv[2])
closed = 0
if point == "shard":
    write = c._ShardWriter.write
    def killing_write(self, out, a):
        global closed
        write(self, out, a)
        if self._file is None:
            closed += 1
            if closed == n:
                os.kill(os.getpid(), signal.SIGKILL)
    c._ShardWriter.write = killing_write
else:
    fsync_dir = c.fsync_dir
    def killing_fsync_dir(path):
        fsync_dir(path)
        os.kill(os.getpid(), signal.SIGKILL)
    c.fsync_dir = killing_fsync_dir
from qwen_mlx.cli import main
sys.exit(main(sys.argv[3:]))
"""


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_killed_convert_leaves_no_output_and_needs_no_cleanup(tiny_checkpoint, tmp_path, tmp_path_factory):
    src, out = tiny_checkpoint("qwen3"), tmp_path / "out"
    args = ["convert", src, out, "--shard-size", "1MB", "-q"]

    def killed(point, n, *extra):
        run = subprocess.run([sys.executable, "-c", KILLER, point, str(n), *map(str, args + list(extra))],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == -9, run.stderr
        partial = list(tmp_path.glob(".out.partial-*"))
        assert len(partial) == 1
        return partial[0]

    partial = killed("shard", 1)
    assert not out.exists() and not (partial / "config.json").exists()
    assert len(list(partial.glob("model-*.safetensors"))) == 1
    with pytest.raises(LoadError):
        load_model(out)

    partial = killed("rename", 0)  # all written and synced, not yet renamed: still not an output
    assert not out.exists() and (partial / "config.json").exists()

    text = tmp_path_factory.mktemp("report") / "text.txt"  # outside tmp_path, whose listing is checked below
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    done = cli(*args, "--report", "--report-text", text)  # the report reads, it does not change the output
    assert done.returncode == 0, done.stderr
    assert "vs source     KL" in done.stdout and "perplexity    source" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the leftovers are gone, no lock file either
    reference = convert(src, tmp_path / "reference", shard_size=10**6, progress=False).path
    for shard in reference.glob("*.safetensors"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()

    # replacing an existing output: killed midway, the previous one is still there, whole
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    killed("shard", 2, "--force", "--bits", "8")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture
def llama_checkpoint(tiny_checkpoint, tmp_path):
    path = tmp_path / "llama"
    path.mkdir()
    config = json.loads((tiny_checkpoint("qwen3") / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    shutil.copy(tiny_checkpoint("qwen3") / "model.safetensors", path)
    return path


def test_user_errors_are_one_line(tiny_checkpoint, llama_checkpoint, tmp_path):
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\0\0\0" + b"\xff" * 16)
    existing = tmp_path / "existing"
    existing.mkdir()
    src = tiny_checkpoint("qwen3")
    cases = {
        "missing": (["/no/such/checkpoint"], "/no/such/checkpoint: no such checkpoint directory"),
        "bits": ([src, "--bits", "7"], "unsupported --bits 7 --group-size 64 for --mode affine"),
        "not qwen": ([llama_checkpoint], "model_type 'llama' is not supported (qwen-mlx runs qwen2, qwen3, qwen3_moe, "
                                       "qwen3_5, qwen3_5_moe, qwen3_next)"),
        "bad gguf": ([bad_gguf], "bad.gguf: not a valid GGUF file (metadata count"),
        "exists": ([src], "already exists (choose another output, or pass --force to replace it)"),
    }
    for case, (args, message) in cases.items():
        out = existing if case == "exists" else tmp_path / "out"
        run = cli("convert", args[0], out, *args[1:])
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, (case, run.stderr)
        assert lines[0].startswith("qwen-mlx: error: ") and message in lines[0], (case, lines[0])
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "existing", "llama"]


def test_help_lists_the_options():
    run = cli("convert", "--help", timeout=30)
    assert run.returncode == 0
    for flag in ("--bits", "--group-size", "--mode", "--recipe", "--dtype", "--dequantize", "--shard-size", "--force",
                 "--report"):
        assert flag in run.stdout
