"""The benchmark's bookkeeping (not its speed: speed is measured by `qwen-mlx bench`, never asserted)."""

import json
import subprocess
import sys

from mlx.utils import tree_flatten

from qwen_mlx.bench import weight_bytes_per_token
from qwen_mlx.loader import load_model

CASE_KEYS = {"model", "bits", "layers", "engine", "prompt_tokens", "gen_tokens", "prefill_tps", "decode_tps",
             "ttft_s", "peak_memory_bytes", "weight_bytes", "kv_cache_bytes", "weight_bytes_per_token",
             "roofline_fraction"}


def test_bench_cli_writes_the_documented_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", "--model", str(tiny_checkpoint("qwen3")),
                          "--prompt-tokens", "8,12", "--gen-tokens", "4", "--repeats", "1", "--warmup", "0",
                          "--bandwidth", "100", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["schema"] == "qwen-mlx-bench/1" and result["bandwidth_gbs"] == 100
    assert [(c["engine"], c["prompt_tokens"]) for c in result["cases"]] == [
        ("qwen-mlx", 8), ("mlx-lm", 8), ("qwen-mlx", 12), ("mlx-lm", 12)]
    for case in result["cases"]:
        assert set(case) == CASE_KEYS
        assert case["decode_tps"] > 0 and case["gen_tokens"] == 4
        expected = case["weight_bytes_per_token"] * case["decode_tps"] / 100e9
        assert abs(case["roofline_fraction"] - expected) <= 1e-12
    assert len(result["ratios"]) == 2 and "decode ours/mlx-lm" in run.stdout


def test_moe_bytes_per_token_counts_only_routed_experts(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen3_moe"))
    cfg = model.config
    params = dict(tree_flatten(model.parameters()))
    experts = sum(p.nbytes for n, p in params.items() if ".switch_mlp." in n)
    embed = params["model.embed_tokens.weight"].nbytes  # untied: one row per token, counted as none
    total = sum(p.nbytes for p in params.values())
    assert weight_bytes_per_token(model, cfg) == total - embed - experts + experts * 2 // 8


def test_bad_flags_get_argparse_errors():
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", "--bits", "3"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "bits must be bf16, 8 or 4" in run.stderr
