"""scripts/bench_serve.py as a user runs it: the scheduler's throughput on the smallest preset, the JSON report
docs/serve.md's figures come from, and its refusals of bad flags (one line, exit status 2)."""

import json
import subprocess
import sys
from pathlib import Path

import bench_serve
import pytest

from qwen_mlx.bench.run import preset_config, random_model

SCRIPT = Path(bench_serve.__file__)
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


@pytest.fixture(scope="module")
def model():
    return random_model(preset_config("qwen3-deep-thin", 1), "4")


def bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--preset", "qwen3-deep-thin", "--layers", "1", "--streams",
                           "1,2", "--tokens", "3", "--prompt-tokens", "4", "--repeats", "1", "--dtype", "float32",
                           *flags], capture_output=True, text=True, timeout=120)


def test_reports_each_stream_count_in_its_json(tmp_path):
    out = tmp_path / "bench.json"
    done = bench("--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert {k: report[k] for k in ("preset", "layers", "bits", "dtype", "tokens", "prompt_tokens", "profiles")} == {
        "preset": "qwen3-deep-thin", "layers": 1, "bits": "4", "dtype": "float32", "tokens": 3, "prompt_tokens": 4,
        "profiles": []}
    assert [r["streams"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        # the streams are admitted one per step, so all n decode together from step n to the end: 3 - n + 1 steps
        assert r["full_steps"] == 3 - r["streams"] + 1
        assert r["tokens_per_second"] > 0 and r["tokens_per_cpu_second"] > 0 and r["step_seconds"] >= 0
    assert [line.split(":")[0].strip() for line in done.stdout.splitlines()] == ["1 streams", "2 streams",
                                                                                 "2 streams / 1"]


def test_ends_cleanly_right_after_its_last_case():
    """The last case's scheduler thread ends just before the process does (no --json to write in between): MLX's
    per-thread state must be freed by then (it aborted the process at exit, status 134, in most runs)."""
    done = bench()
    assert done.returncode == 0, done.stderr[-2000:]


def test_profile_times_every_projection(model):
    profiles = bench_serve.profile(model, [1, 2], prompt_tokens=4, repeats=1, seed=0)
    assert [p["streams"] for p in profiles] == [1, 2]
    for p in profiles:
        assert set(p["matmuls"]) == PROJECTIONS  # one dense Qwen3 layer and the tied head
        assert all(p[k] >= 0 for k in ("step_cpu_seconds", "rest_cpu_seconds", "scheduler_cpu_seconds"))
        assert p["forward_cpu_seconds"] > 0


@pytest.mark.parametrize("flags,message", [
    (["--streams", "0"], "argument --streams: must be at least 1, got 0"),
    (["--streams", "1,x"], "argument --streams: expected comma-separated counts like 1,8, got '1,x'"),
    (["--tokens", "-1"], "argument --tokens: must be at least 1, got -1"),
    (["--streams", "1,8", "--tokens", "4"], "argument --tokens: must be at least the largest --streams count (8)"),
    (["--prompt-tokens", "0"], "argument --prompt-tokens: must be at least 1, got 0"),
    (["--preset", "qwen9"], "argument --preset: invalid choice: 'qwen9'"),
    (["--bits", "7"], "argument --bits: invalid choice: '7'"),
    (["--json", "/no/such/dir/out.json"], "argument --json: no such directory: /no/such/dir"),
])
def test_bad_flags_are_refused_in_one_line(monkeypatch, capsys, flags, message):
    """Refused before any model is built (in this process: the script's parser, as its own run would meet it)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *flags])
    with pytest.raises(SystemExit) as exit_:
        bench_serve.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("bench_serve.py: error: ") and message in err, err


def test_a_failed_step_is_raised_not_timed(model, monkeypatch):
    """A step that fails ends its sequences early in the scheduler (a server lives on); the benchmark must not
    report the steps that did run as if the case had completed."""

    def broken(*args):
        raise RuntimeError("broken step")

    monkeypatch.setattr("qwen_mlx.serve.scheduler.decode_logits", broken)
    with pytest.raises(RuntimeError, match="broken step"):
        bench_serve.run(model, 2, 4, 3, seed=0)
