"""The benchmark's bookkeeping (not its speed: speed is measured by `qwen-mlx bench`, never asserted)."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from qwen_mlx.bench.context import filled_cache_mlx_lm, filled_cache_ours
from qwen_mlx.bench.overhead import count_graph
from qwen_mlx.bench.run import mlx_lm_twin, weight_bytes_per_token
from qwen_mlx.engine.generate import generate_tokens
from qwen_mlx.weights.loader import load_model

DOC_KEYS = {"schema", "device", "bandwidth_gbs", "bandwidth_source", "mlx_version", "mlx_lm_version", "cases",
            "ratios", "context_cases", "context_ratios", "rotating_run", "overhead_cases", "overhead_ratios"}
CASE_KEYS = {"model", "bits", "layers", "engine", "prompt_tokens", "gen_tokens", "prefill_tps", "decode_tps",
             "ttft_s", "peak_memory_bytes", "weight_bytes", "kv_cache_bytes", "weight_bytes_per_token",
             "roofline_fraction", "decode_peak_memory_bytes", "memory_limit_bytes", "memory_ok"}
CONTEXT_KEYS = {"model", "bits", "layers", "engine", "cache", "max_kv_size", "kv_bits", "context_tokens",
                "context_source", "gen_tokens", "decode_tps", "ttft_s", "peak_memory_bytes",
                "decode_peak_memory_bytes", "weight_bytes", "kv_cache_bytes", "bytes_per_token", "roofline_fraction",
                "memory_limit_bytes", "memory_ok"}
ROTATING_KEYS = {"model", "bits", "layers", "max_kv_size", "keep", "prompt_tokens", "gen_tokens", "decode_tps",
                 "samples", "flat"}
SAMPLE_KEYS = {"generated_tokens", "active_memory_bytes", "peak_memory_bytes", "kv_cache_bytes"}
OVERHEAD_KEYS = {"model", "bits", "layers", "engine", "prompt_tokens", "gen_tokens", "decode_ms_per_token",
                 "build_ms_per_token", "graph_nodes", "graph_ops"}
OVERHEAD_RATIO_KEYS = {"model", "bits", "decode_time_ratio", "build_time_ratio", "graph_nodes_ratio",
                       "graph_ops_ratio"}


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_bench_cli_writes_the_documented_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    run = bench_cli("--model", str(tiny_checkpoint("qwen3")), "--prompt-tokens", "8,12", "--gen-tokens", "4",
                    "--repeats", "1", "--warmup", "0", "--bandwidth", "100", "--json", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert set(result) == DOC_KEYS and result["context_cases"] == [] and result["rotating_run"] is None
    assert result["schema"] == "qwen-mlx-bench/1" and result["bandwidth_gbs"] == 100
    assert [(c["engine"], c["prompt_tokens"]) for c in result["cases"]] == [
        ("qwen-mlx", 8), ("mlx-lm", 8), ("qwen-mlx", 12), ("mlx-lm", 12)]
    for case in result["cases"]:
        assert set(case) == CASE_KEYS
        assert case["decode_tps"] > 0 and case["gen_tokens"] == 4
        expected = case["weight_bytes_per_token"] * case["decode_tps"] / 100e9
        assert abs(case["roofline_fraction"] - expected) <= 1e-12
        limit = int((case["weight_bytes"] + case["kv_cache_bytes"]) * 1.1)
        assert case["memory_limit_bytes"] == limit
        assert case["memory_ok"] == (0 < case["decode_peak_memory_bytes"] <= limit)
    assert len(result["ratios"]) == 2 and "decode ours/mlx-lm" in run.stdout


def test_moe_bytes_per_token_counts_only_routed_experts(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen3_moe"))
    cfg = model.config
    params = dict(tree_flatten(model.parameters()))
    experts = sum(p.nbytes for n, p in params.items() if ".switch_mlp." in n)
    embed = params["model.embed_tokens.weight"].nbytes  # untied: one row per token, counted as none
    total = sum(p.nbytes for p in params.values())
    assert weight_bytes_per_token(model, cfg) == total - embed - experts + experts * 2 // 8


@pytest.mark.slow  # 7 s: a bench run end to end (two context cases, the plot); the parts have default tests
def test_context_cases_json_and_plot(tiny_checkpoint, tmp_path):
    out, svg = tmp_path / "bench.json", tmp_path / "context.svg"
    run = bench_cli("--model", str(tiny_checkpoint("qwen3")), "--context", "40,300", "--cache",
                    "plain,rotating,kv8,rotating-kv4", "--max-kv-size", "64", "--gen-tokens", "4", "--repeats", "1",
                    "--warmup", "0", "--json", str(out), "--plot", str(svg))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["cases"] == [] and result["schema"] == "qwen-mlx-bench/1"
    cases = result["context_cases"]
    assert [(c["context_tokens"], c["cache"], c["engine"]) for c in cases[:7]] == [
        (40, "plain", "qwen-mlx"), (40, "plain", "mlx-lm"), (40, "rotating", "qwen-mlx"), (40, "rotating", "mlx-lm"),
        (40, "kv8", "qwen-mlx"), (40, "kv8", "mlx-lm"), (40, "rotating-kv4", "qwen-mlx")]  # mlx-lm: no such cache
    for case in cases:
        assert set(case) == CONTEXT_KEYS and case["decode_tps"] > 0 and case["context_source"] == "random-kv"
        assert case["max_kv_size"] == (64 if case["cache"].startswith("rotating") else None)
    held = {(c["context_tokens"], c["cache"], c["engine"]): c["kv_cache_bytes"] for c in cases}
    assert held[300, "rotating", "qwen-mlx"] < held[300, "plain", "qwen-mlx"]  # the window, not the context
    assert held[300, "kv8", "qwen-mlx"] < held[300, "plain", "qwen-mlx"]
    ratios = {(r["context_tokens"], r["cache"]): r["decode_ratio"] for r in result["context_ratios"]}
    assert ratios[300, "rotating-kv4"] is None and ratios[300, "plain"] > 0
    assert "n/a" in run.stdout and "decode ours/mlx-lm" in run.stdout
    lines = ET.parse(svg).getroot().findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 7  # 4 kinds for ours, 3 for mlx-lm


@pytest.mark.parametrize("kind", ["plain", "rotating", "kv8"])
def test_filled_caches_hold_the_same_context(tiny_checkpoint, kind):
    """Both engines decode the same greedy tokens after the same directly built context (here past the window)."""
    model, _ = load_model(tiny_checkpoint("qwen3"))
    twin = mlx_lm_twin(model, model.config, "bf16")
    ours_cache = filled_cache_ours(model.config, kind, 300, 64, seed=3)
    theirs_cache = filled_cache_mlx_lm(model.config, kind, 300, 64, seed=3)
    ours = list(generate_tokens(model, [7], ours_cache, max_tokens=6))
    theirs = [int(t) for t, _ in generate_step(mx.array([7]), twin, max_tokens=6, prompt_cache=theirs_cache,
                                                sampler=lambda x: mx.argmax(x, axis=-1))]
    assert ours == theirs


def test_rotating_run_reports_flat_memory(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    run = bench_cli("--model", str(tiny_checkpoint("qwen3")), "--rotating-run", "--max-kv-size", "32", "--json",
                    str(out))
    assert run.returncode == 0, run.stderr
    rot = json.loads(out.read_text())["rotating_run"]
    assert set(rot) == ROTATING_KEYS and all(set(sample) == SAMPLE_KEYS for sample in rot["samples"])
    assert (rot["max_kv_size"], rot["prompt_tokens"], rot["gen_tokens"]) == (32, 32, 128)
    assert [s["generated_tokens"] for s in rot["samples"]] == [1, 32, 64, 96, 128]
    assert len({s["kv_cache_bytes"] for s in rot["samples"][1:]}) == 1 and rot["flat"], rot
    assert "memory flat" in run.stdout


def test_overhead_cli_prints_and_writes_each_figure(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    run = bench_cli("--overhead", "--model", str(tiny_checkpoint("qwen3")), "--prompt-tokens", "5", "--gen-tokens",
                    "4", "--repeats", "1", "--warmup", "0", "--bandwidth", "100", "--json", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert set(result) == DOC_KEYS and result["cases"] == [] and result["context_cases"] == []
    cases = result["overhead_cases"]
    assert [c["engine"] for c in cases] == ["qwen-mlx", "mlx-lm"]
    for case in cases:
        assert set(case) == OVERHEAD_KEYS and (case["prompt_tokens"], case["gen_tokens"]) == (5, 4)
        assert case["decode_ms_per_token"] > 0 and case["build_ms_per_token"] > 0
        assert case["graph_nodes"] > case["graph_ops"] > 10 * case["layers"]  # a transformer step, weights as leaves
    [ratio] = result["overhead_ratios"]
    assert set(ratio) == OVERHEAD_RATIO_KEYS
    ours, theirs = cases
    assert ratio["graph_ops_ratio"] == ours["graph_ops"] / theirs["graph_ops"]
    for header in ("decode ms/tok", "build ms/tok", "graph nodes", "graph ops", "decode time ours/mlx-lm",
                   "build time ours/mlx-lm", "nodes ours/mlx-lm"):
        assert header in run.stdout
    run = bench_cli("--overhead", "--prompt-tokens", "4,8")
    assert run.returncode == 2 and "--overhead takes one --prompt-tokens length" in run.stderr


def test_graph_count_of_a_known_graph():
    x, y, m = mx.array([1.0, 2.0]), mx.array([3.0, 4.0]), mx.ones((4, 64))
    mx.eval(x, y, m)
    z = x + y
    w = mx.exp(z) * z
    assert count_graph(w) == (5, 3)  # x, y, z, exp(z), w; add, exp, multiply (z reached twice, counted once)
    assert count_graph(w, z) == (5, 3)
    assert count_graph(x) == (1, 0)  # evaluated: a leaf
    q, scales, biases = mx.quantize(m, group_size=64, bits=4)
    assert count_graph(q, scales, biases) == (4, 1)  # one primitive, three outputs
    assert count_graph(scales) == (4, 1)  # a sibling output brings the primitive's others


def test_bad_flags_get_argparse_errors():
    run = bench_cli("--bits", "3")
    assert run.returncode == 2 and "bits must be bf16, 8 or 4" in run.stderr
    run = bench_cli("--context", "100", "--cache", "rotating-kv3")
    assert run.returncode == 2 and "cache kinds are" in run.stderr
    run = bench_cli("--plot", "x.svg")
    assert run.returncode == 2 and "give --context too" in run.stderr


def test_docs_list_every_json_key():
    """docs/bench.md is the schema's documentation: every key the JSON holds is named there."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "bench.md").read_text()
    schema = doc[doc.index("## JSON schema"):]
    keys = DOC_KEYS | CASE_KEYS | CONTEXT_KEYS | ROTATING_KEYS | SAMPLE_KEYS | OVERHEAD_KEYS | OVERHEAD_RATIO_KEYS
    missing = [key for key in keys if f'"{key}"' not in schema]
    assert not missing, f"docs/bench.md does not document {missing}"


@pytest.mark.parametrize("preset", ["qwen3.5-4b", "qwen3.5-35b-a3b", "qwen3-next-80b-a3b"])
def test_hybrid_preset_twin_is_mlx_lms_model_on_our_weights(preset):
    """The bench's mlx-lm side of a hybrid preset (shrunk: 4 layers, narrow, few experts) computes what ours does
    on the same arrays: mlx-lm's own qwen3_5 / qwen3_5_moe / qwen3_next class, rope read as ours reads it."""
    from qwen_mlx.bench.run import PRESETS, random_model
    from qwen_mlx.models.config import ModelConfig

    small = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=192, vocab_size=512, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=32, linear_value_head_dim=32)
    if "num_experts" in PRESETS[preset]:
        small.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    cfg = ModelConfig.from_dict({**PRESETS[preset], **small}, preset)
    mx.random.seed(0)
    model = random_model(cfg, "bf16")
    model.set_dtype(mx.float32)
    twin = mlx_lm_twin(model, cfg, "bf16")
    ids = mx.array([[3, 14, 159, 26, 53, 58, 97, 93, 238, 46, 264, 33]])
    assert mx.abs(model(ids) - twin(ids)).max().item() <= 1e-3
