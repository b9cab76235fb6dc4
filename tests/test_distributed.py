"""One model over several processes: real `mlx.launch --backend ring` runs on 127.0.0.1 against the single-process
model. fp32 logits of the whole prompt agree within 1e-4 (max abs) and 24 greedy tokens are identical.

Note: mlx.launch exits 0 even when ranks fail, so these tests read the ranks' output, never its exit status.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from bench_distributed import free_ports, ring_command
from helpers import greedy_ours, prompt_ids
from mlx.utils import tree_flatten

from qwen_mlx.cache.kv import make_cache
from qwen_mlx.distributed.plan import DistributedError, check_tensor_split, expert_range, memory_plan, plan_stages
from qwen_mlx.distributed.shard import HeldExperts, Stage
from qwen_mlx.models.qwen3 import checkpoint_weights
from qwen_mlx.weights.loader import load_config, load_model
from qwen_mlx.weights.names import LoadError
from qwen_mlx.weights.quant import quantize_model

TOL = 1e-4  # max abs difference of fp32 logits (only the order of additions differs)
N_TOKENS = 24
PROMPT = prompt_ids(12, seed=3)


def errors(out: str) -> list[str]:
    """Our one-line errors; found anywhere, since mlx.launch may print its own warnings in the middle of a line."""
    return re.findall(r"qwen-mlx distributed: rank \d+: [^\n]*", out)


def run_launcher(n: int, *command: str, timeout: float = 60) -> tuple[str, str, float]:
    """`mlx.launch --backend ring -n n` of `python command...` on 127.0.0.1: the ranks' stdout, their stderr (each
    in one stream, as mlx.launch passes them on) and the seconds it took. Every process is killed if it runs past
    `timeout`."""
    cmd = ring_command(n, *command)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch did not finish within {timeout} s:\n{out}\n{err}")
    return out, err, time.monotonic() - start


def launch(n: int, path: Path, mode: str, *extra: str, max_tokens: int = N_TOKENS,
           timeout: float = 60) -> tuple[dict | None, str, float]:
    """Run `python -m qwen_mlx.distributed generate` on n local ring ranks; returns rank 0's JSON line (or None),
    all output, and the seconds it took."""
    out, err, elapsed = run_launcher(n, "-m", "qwen_mlx.distributed", "generate", "--model", str(path), "--mode",
                                     mode, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens",
                                     str(max_tokens), "--timeout", "20", *extra, timeout=timeout)
    out += err
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), out, elapsed


_REFERENCE: dict[Path, tuple[np.ndarray, list[int]]] = {}


def reference(path: Path) -> tuple[np.ndarray, list[int]]:
    """The single-process logits of PROMPT (L, vocab) and greedy tokens, through the KV cache."""
    if path not in _REFERENCE:
        model, _ = load_model(path)
        logits = np.array(model(mx.array(PROMPT)[None])[0])
        _REFERENCE[path] = logits, greedy_ours(model, PROMPT, N_TOKENS)
    return _REFERENCE[path]


def check_equal_to_single_process(path: Path, n: int, mode: str, tmp_path: Path) -> dict:
    out_file = tmp_path / f"logits-{mode}-{n}.npy"
    result, out, _ = launch(n, path, mode, "--logits-out", str(out_file))
    assert result is not None, out
    logits, tokens = reference(path)
    got = np.load(out_file)
    assert got.shape == logits.shape
    err = float(np.abs(got - logits).max())
    assert err <= TOL, f"max abs logit difference {err:.2e} > {TOL:g} ({mode}, -n {n})"
    assert result["tokens"] == tokens
    return result


@pytest.mark.parametrize("variant,mode,n", [  # 3-6 s each: the default run keeps one per mode, CI runs all
    ("qwen3", "pipeline", 2), pytest.param("qwen3", "tensor", 2, marks=pytest.mark.slow),
    pytest.param("qwen2", "pipeline", 2, marks=pytest.mark.slow), ("qwen2", "tensor", 2),
    pytest.param("qwen3_moe", "tensor", 2, marks=pytest.mark.slow),
    pytest.param("qwen3_moe", "expert", 2, marks=pytest.mark.slow),
    pytest.param("qwen3_moe", "pipeline", 3, marks=pytest.mark.slow),
    ("qwen3_moe", "expert", 3),  # uneven: 8 experts as 3 + 3 + 2
])
def test_distributed_equals_single_process(tiny_checkpoint, tmp_path, variant, mode, n):
    result = check_equal_to_single_process(tiny_checkpoint(variant), n, mode, tmp_path)
    assert result["ranks"] == n
    cfg = load_config(tiny_checkpoint(variant))
    # what `qwen-mlx info --distributed N` predicts from the headers is what each rank holds
    assert result["weights_bytes"] == pytest.approx(memory_plan(tiny_checkpoint(variant), n)[mode], rel=1e-3)
    if mode == "pipeline":  # contiguous stages covering every layer once
        assert [a for a, _ in result["layers"]][0] == 0 and result["layers"][-1][1] == cfg.num_hidden_layers
        assert all(b == c for (_, b), (c, _) in zip(result["layers"], result["layers"][1:]))
    for weights, peak in zip(result["weights_bytes"], result["load_peak_bytes"]):  # each rank reads its share
        assert peak <= 1.1 * weights


@pytest.mark.parametrize("variant,mode,options", [
    ("qwen3", "pipeline", dict(max_size=20)), ("qwen3", "tensor", dict(max_size=20, bits=8)),
    pytest.param("qwen3_moe", "expert", dict(bits=4), marks=pytest.mark.slow),  # 3.4 s: CI runs it
])
def test_kv_caches(tiny_checkpoint, tmp_path, variant, mode, options):
    """A rotating window that wraps (12 prompt + 24 new tokens in 20) and quantized caches: the same tokens as the
    single-process model with the same cache."""
    path = tiny_checkpoint(variant)
    flags = {"max_size": "--max-kv-size", "bits": "--kv-bits"}
    extra = [x for k, v in options.items() for x in (flags[k], str(v))]
    result, out, _ = launch(2, path, mode, *extra)
    assert result is not None, out
    model, _ = load_model(path)
    cache = make_cache(model.config, **options)
    # the distributed run prefills all but the last prompt token, then decodes: do the same here
    model(mx.array(PROMPT[:-1])[None], cache)
    expected, token = [], mx.array([int(PROMPT[-1])])
    for _ in range(N_TOKENS):
        token = mx.argmax(model(token[None], cache)[:, -1], axis=-1)
        expected.append(token.item())
    assert result["tokens"] == expected


def write_quantized(src: Path, dst: Path, group_size: int, bits: int) -> Path:
    """An MLX-quantized copy of a checkpoint (mlx-lm's layout: packed weights, scales, biases, config section)."""
    model, _ = load_model(src)
    quantize_model(model, {"group_size": group_size, "bits": bits})
    dst.mkdir()
    weights = {k: mx.contiguous(v) for k, v in checkpoint_weights(dict(tree_flatten(model.parameters()))).items()}
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("variant,mode", [("qwen3", "tensor"),  # 4 s each: the default run keeps one, CI runs all
                                          pytest.param("qwen3_moe", "expert", marks=pytest.mark.slow),
                                          pytest.param("qwen3_moe", "pipeline", marks=pytest.mark.slow)])
def test_quantized_checkpoint(tiny_checkpoint, tmp_path, variant, mode):
    path = write_quantized(tiny_checkpoint(variant), tmp_path / "q", 32, 8)
    result = check_equal_to_single_process(path, 2, mode, tmp_path)
    assert result["weights_bytes"][0] < 0.5 * (tiny_checkpoint(variant) / "model.safetensors").stat().st_size


def cli(*args: str) -> list[str]:
    return ["-m", "qwen_mlx.cli", *args]


@pytest.mark.slow  # 13 s: two ranks launched
def test_cli_generate_prints_the_single_process_text(tiny_checkpoint):
    """`qwen-mlx generate --distributed auto` on 2 ranks: the text of the single-process command, printed by rank 0
    only (the dense tiny model's 2 KV heads split: auto picks tensor parallel); the same through `qwen-mlx launch`
    (rank 0 in the foreground) with a pipeline."""
    args = ["generate", "-m", str(tiny_checkpoint("qwen3")), "-p", "Tell me about MLX", "--max-tokens", "24",
            "--temp", "0", "--hide-think"]
    single = subprocess.run([sys.executable, *cli(*args)], capture_output=True, text=True, timeout=60)
    assert single.returncode == 0 and single.stdout.strip(), single.stderr
    out, err, _ = run_launcher(2, *cli(*args, "--distributed", "auto", "--verbose"))
    assert out == single.stdout, err
    assert "qwen-mlx: --distributed auto: tensor (" in err and "finished: length" in err and not errors(err)
    launched = subprocess.run([sys.executable, *cli("launch", "-n", "2", "--port", str(free_ports(2)), "--", *args,
                                                    "--distributed", "pipeline")],
                              capture_output=True, text=True, timeout=60)
    assert launched.returncode == 0 and launched.stdout == single.stdout, launched.stderr


@pytest.mark.slow  # 15 s: two ranks launched
def test_chat_engine_on_rank_0_with_the_other_rank_serving(tiny_checkpoint):
    """The chat app's engine on rank 0 (no app: driven from a worker thread like the app does) over a pipeline of
    2 ranks: four turns, one stopped early as Esc does, give exactly the single-process replies, the KV cache
    reused across turns alike; rank 1 serves until rank 0 quits and both end cleanly."""
    from distributed_chat import replies

    import qwen_mlx

    path = tiny_checkpoint("qwen3_moe")
    out, err, _ = run_launcher(2, str(Path(__file__).parent / "distributed_chat.py"), str(path), "pipeline")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {"served": True} in lines and not errors(err), out + err
    got = next(line["replies"] for line in lines if "replies" in line)
    expected = replies(qwen_mlx.load(path))
    assert [r["finish"] for r in expected] == ["length", "length", "cancelled", "length"]
    assert got == expected


def rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the local rank whose command line holds `marker`."""
    for entry in Path("/proc").iterdir():
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace") and \
                    f"MLX_RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, ValueError):
            continue
    return None


def test_killed_rank_ends_the_others_with_one_clear_error(tiny_checkpoint):
    """`qwen-mlx generate --distributed pipeline` on 2 ranks; rank 1 is killed (SIGKILL) once rank 0 streams text:
    rank 0 stops with one line well within 10 s."""
    path = tiny_checkpoint("qwen3")
    cmd = ring_command(2, *cli("generate", "-m", str(path), "-p", "Tell me a long story", "--max-tokens", "100000",
                               "--temp", "0", "--distributed", "pipeline"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    try:
        out = ""
        while len(out) < 20:  # rank 0 streams the answer
            piece = proc.stdout.read(1)
            assert piece, f"mlx.launch ended early:\n{out}"
            out += piece
        pid = rank_pid(1, str(path))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        rest, _ = proc.communicate(timeout=30)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out += rest
    assert took < 10, f"rank 0 took {took:.1f} s to stop:\n{out}"
    lines = errors(out)
    assert len(lines) == 1 and lines[0].startswith("qwen-mlx distributed: rank 0:"), out
    assert "lost the connection to another rank" in lines[0] or "SIGTERM" in lines[0]


def test_tensor_split_that_does_not_divide_names_the_valid_n(tiny_checkpoint):
    result, out, _ = launch(3, tiny_checkpoint("qwen3"), "tensor", max_tokens=2)
    assert result is None
    said = errors(out)
    assert len(said) == 1, out  # said once, by rank 0
    assert "-n 3" in said[0] and "use -n 1 or 2" in said[0], said[0]
    with pytest.raises(DistributedError, match="use -n 1 or 2"):
        check_tensor_split(load_config(tiny_checkpoint("qwen3")), 4)


def test_plan_stages_balances_bytes_and_allows_uneven_counts():
    assert plan_stages([10] * 4, 2) == [range(0, 2), range(2, 4)]
    assert plan_stages([10] * 5, 2) in ([range(0, 3), range(3, 5)], [range(0, 2), range(2, 5)])
    assert plan_stages([10] * 4, 2, first_extra=25) == [range(0, 1), range(1, 4)]  # the embedding counts
    assert plan_stages([30, 10, 10, 10], 2) == [range(0, 1), range(1, 4)]
    assert plan_stages([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(DistributedError, match="use -n 1 to 3"):
        plan_stages([1, 1, 1], 4)


def test_expert_ranges_cover_every_expert_once():
    for e, n in [(8, 2), (8, 3), (128, 3), (5, 5)]:
        ranges = [expert_range(e, r, n) for r in range(n)]
        assert [i for r in ranges for i in r] == list(range(e))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_a_stage_reads_only_its_own_tensors(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    full, _ = load_model(path)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    last, _ = load_model(path, part=Stage(range(2, 3)))
    names = {k for k, _ in tree_flatten(last.parameters())}
    assert names == {k.replace("layers.2.", "layers.0.") for k, _ in tree_flatten(full.parameters())
                     if k.startswith(("model.layers.2.", "model.norm.", "lm_head."))}
    stage_bytes = sum(p.nbytes for _, p in tree_flatten(last.parameters()))
    assert mx.get_peak_memory() - base <= 1.1 * stage_bytes
    h = mx.random.normal((1, 5, full.config.hidden_size))
    assert mx.allclose(last.layers[0](h, None), full.layers[2](h, None), atol=1e-6)


@pytest.mark.parametrize("layout", ["hugging_face", "mlx_lm_quantized"])
def test_a_rank_reads_only_its_own_experts(tiny_checkpoint, tmp_path, layout):
    """load_model(part=HeldExperts(range)) reads only those experts of each MoE layer, from per-expert tensors (Hugging
    Face's layout) or from slices of stacked ones (mlx-lm's, here quantized with bfloat16 scales). A small
    vocabulary and wider experts, so that the experts are most of the model and reading all would break the bound."""
    experts_first = dict(vocab_size=256, moe_intermediate_size=128)
    path = tiny_checkpoint("qwen3_moe", **experts_first)
    if layout == "mlx_lm_quantized":
        path = write_quantized(tiny_checkpoint("qwen3_moe", "bfloat16", **experts_first), tmp_path / "q", 32, 8)
    full, _ = load_model(path)
    experts = expert_range(full.config.num_experts, 1, 3)  # 3, 4, 5 of 8
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mine, _ = load_model(path, part=HeldExperts(experts))
    loaded = sum(p.nbytes for _, p in tree_flatten(mine.parameters()))
    assert mx.get_peak_memory() - base <= 1.1 * loaded
    whole = dict(tree_flatten(full.parameters()))
    all_experts = sum(p.nbytes for name, p in whole.items() if ".switch_mlp." in name)
    assert all_experts * (1 - len(experts) / 8) > 0.1 * loaded  # the bound holds only if the others were not read
    params = dict(tree_flatten(mine.parameters()))
    assert set(params) == set(whole)
    for name, p in params.items():
        expected = whole[name][experts.start:experts.stop] if ".switch_mlp." in name else whole[name]
        assert p.dtype == expected.dtype and mx.array_equal(p, expected), name
    assert params["model.layers.0.mlp.gate.weight"].shape == whole["model.layers.0.mlp.gate.weight"].shape


def test_an_expert_range_outside_the_model_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(LoadError, match="experts 6..8 are not a range of this model's 8 experts"):
        load_model(tiny_checkpoint("qwen3_moe"), part=HeldExperts(range(6, 9)))
    with pytest.raises(LoadError, match="experts 0..0 are not a range of this model's 0 experts"):
        load_model(tiny_checkpoint("qwen3"), part=HeldExperts(range(0, 1)))
    path = write_quantized(tiny_checkpoint("qwen3_moe"), tmp_path / "q", 32, 8)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_experts": 4}))
    with pytest.raises(LoadError, match=r"switch_mlp\.\w+_proj\.\w+ has shape \(8, .*8 experts, the config needs 4"):
        load_model(path, part=HeldExperts(range(0, 2)))


def test_distributed_without_a_launcher_runs_in_one_process_with_a_note(tiny_checkpoint):
    args = ["-m", "qwen_mlx.cli", "generate", "-m", str(tiny_checkpoint("qwen3")), "-p", "hi", "--max-tokens", "6",
            "--temp", "0"]
    plain = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
    alone = subprocess.run([sys.executable, *args, "--distributed", "auto"], capture_output=True, text=True,
                           timeout=60)
    assert alone.returncode == 0 and alone.stdout == plain.stdout
    assert "--distributed auto: one process, not several started by mlx.launch" in alone.stderr


@pytest.mark.slow
@pytest.mark.parametrize("variant,mode", [("qwen3_5", "pipeline"), ("qwen3_5_moe", "expert")])
def test_hybrid_model_over_two_ranks_equals_single_process(hybrid_checkpoint, tmp_path, variant, mode):
    """A hybrid model's stages hold whatever layers fall to them (each linear layer's recurrent cache with it; the
    image-text file's vision tower read by no rank); expert mode splits the routed experts and runs the shared
    expert whole on every rank."""
    result = check_equal_to_single_process(hybrid_checkpoint(variant), 2, mode, tmp_path)
    assert result["weights_bytes"] == pytest.approx(memory_plan(hybrid_checkpoint(variant), 2)[mode], rel=1e-3)


def test_tensor_mode_refuses_a_hybrid_model_in_one_line(hybrid_checkpoint):
    with pytest.raises(DistributedError, match="^--mode tensor does not split a qwen3_5 model's Gated DeltaNet "
                                                "layers: use --mode pipeline$"):
        check_tensor_split(load_config(hybrid_checkpoint("qwen3_5")), 2)
