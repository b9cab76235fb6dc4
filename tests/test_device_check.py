"""scripts/device_check.py's own logic on the CPU: with the reference path standing in for the kernels its checks
pass, and a wrong result fails them. (Its real run, on the GPU, is described in docs/kernels.md.)"""

from contextlib import contextmanager

import device_check
import mlx.core as mx
import pytest

from qwen_mlx.bench.run import preset_config
from qwen_mlx.kernels import ops as kernels
from qwen_mlx.models.rope import Rope, make_rope


@pytest.fixture
def reference_only(monkeypatch):
    """The reference path standing in for the kernels: MLX's ops where the op has them, and the model page's math
    for the router and RoPE (whose ops are the kernel alone)."""
    original = device_check.kernels_choice

    @contextmanager
    def choice(_):
        with original("reference"):
            yield

    monkeypatch.setattr(device_check, "kernels_choice", choice)
    monkeypatch.setattr(kernels, "route", device_check.reference_route)
    monkeypatch.setattr(kernels, "rope", lambda q, k, inv_freq, *, offset, norms=None: device_check.reference_rope(
        q, k, Rope(inv_freq, 1.0, 1.0 / inv_freq), offset, norms))


def test_qmatmul_check_passes_the_reference_and_catches_a_wrong_result(reference_only, monkeypatch):
    args = ((4, 3), (64,), ("float32", "bfloat16"), (1, 2), {"tiny": (16, 256)}, lambda *_: None)
    rows = device_check.check_qmatmul(*args)
    assert len(rows) == 8 and all(r["ok"] and r["vs_mlx"] == 0 for r in rows)
    right = kernels.qmatmul
    monkeypatch.setattr(kernels, "qmatmul", lambda *a: right(*a) * 1.05)
    assert not any(r["ok"] for r in device_check.check_qmatmul(*args))


TINY_EXPERTS = {"tiny gate/up": (8, 16, 256), "tiny down": (8, 32, 128)}  # (E, N, K)


def test_gather_qmv_check_passes_the_reference_and_catches_a_wrong_result(reference_only, monkeypatch):
    args = ((4, 8), (64,), ("float32", "bfloat16"), (1, 2), TINY_EXPERTS, lambda *_: None)
    rows = device_check.check_gather_qmv(*args)
    assert len(rows) == 2 * 2 * 2 * 2 * 3 and all(r["ok"] and r["vs_mlx"] == 0 for r in rows)
    assert {r["routing"] for r in rows} == {"random", "one expert", "repeated"}
    right = kernels.gather_qmm
    monkeypatch.setattr(kernels, "gather_qmm", lambda *a: right(*a) * 1.05)
    assert not any(r["ok"] for r in device_check.check_gather_qmv(*args))


def test_routings_are_top_k_per_token():
    for name, experts in device_check.routings(3, 16, seed=0).items():
        assert experts.shape == (3, device_check.TOP_K) and experts.dtype == mx.int32, name
        assert 0 <= experts.min().item() and experts.max().item() < 16, name
    random = device_check.routings(3, 16, seed=0)["random"].tolist()
    assert all(len(set(row)) == device_check.TOP_K for row in random)


def test_gather_qmv_bench_runs(reference_only, monkeypatch):
    monkeypatch.setattr(device_check, "time_per_call", lambda fn, operands, x: mx.eval(fn(x, *operands[0])) or 1e-6)
    rows = device_check.bench_gather_qmv(TINY_EXPERTS, [("tiny gate/up", 1), ("tiny down", 2)], 1000.0,
                                         lambda *_: None)
    assert [(r["shape"], r["tokens"], r["ours_us"]) for r in rows] == [("tiny gate/up", 1, 1.0), ("tiny down", 2, 1.0)]
    assert all(r["target_met"] and r["target_speedup"] is None for r in rows)


def test_rope_check_passes_the_reference_and_catches_a_wrong_result(reference_only, monkeypatch):
    rope = make_rope(preset_config("qwen3-0.6b", 1))
    q, k = mx.random.normal((1, 3, 4, 128)), mx.random.normal((1, 3, 2, 128))
    norms = (mx.ones(128) * 1.2, mx.ones(128) * 0.8, 1e-6)
    for offset in (0, 4096):
        assert device_check.rope_case(rope, q, k, offset, norms, "float32", "tiny", "default")["ok"]
    right = kernels.rope
    monkeypatch.setattr(kernels, "rope", lambda q, k, *a, **kw: (right(q, k, *a, **kw)[0], right(q, k, *a, **kw)[1]
                                                                 * 1.01))
    assert not device_check.rope_case(rope, q, k, 5, norms, "float32", "tiny", "default")["ok"]


def test_time_per_call_is_per_call():
    x = mx.ones((4, 4))
    seconds = device_check.time_per_call(lambda x, w: x @ w, [(mx.ones((4, 4)),)], x, calls=8, rounds=1)
    assert 0 < seconds < 1


def test_fused_check_passes_the_reference_and_catches_a_wrong_result(reference_only, monkeypatch):
    models = {"tiny": (64, 32, 96, 128), "tiny attention only": (64, 32, None, 128)}  # (q, kv, intermediate, hidden)
    args = ((4,), (64,), ("float32", "bfloat16"), (1, 2), models, {"tiny experts": (8, 2 * 64, 128)}, lambda *_: None)
    rows = device_check.check_fused(*args)
    ops = [r["op"] for r in rows]
    assert ops.count("linears q") == 8 and ops.count("linears pair k") == 8 and ops.count("swiglu") == 4
    assert ops.count("expert_sum") == 12
    assert all(r["ok"] for r in rows)
    for name in ("linears", "swiglu", "expert_swiglu", "expert_sum"):
        right = getattr(kernels, name)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, name, lambda *a, right=right: (
                [y * 1.05 for y in right(*a)] if name == "linears" else right(*a) * 1.05))
            assert not all(r["ok"] for r in device_check.check_fused(*args)), name


def test_fused_bench_runs(reference_only, monkeypatch):
    monkeypatch.setattr(device_check, "time_per_call", lambda fn, operands, x: mx.eval(fn(x, *operands[0])) or 1e-6)
    rows = device_check.bench_fused(lambda *_: None, dense=(64, 32, 96, 128), experts=(8, 128, 128), copies=4)
    assert [r["case"] for r in rows] == ["4b q/k/v, one launch", "4b gate/up + SwiGLU, one launch",
                                         "30b-a3b experts, 2 launches", "30b-a3b router, one launch"]
    assert all(r["fused_us"] == 1.0 for r in rows)


def test_router_check_passes_the_reference_and_catches_a_wrong_result(reference_only, monkeypatch):
    rows = device_check.check_router(("float32", "bfloat16"), (1, 3), lambda *_: None)
    assert len(rows) == 8 and all(r["ok"] for r in rows)
    right = kernels.route
    monkeypatch.setattr(kernels, "route", lambda logits, k, norm: (right(logits, k, norm)[0],
                                                                   right(logits, k, norm)[1] * 1.01))
    assert not any(r["ok"] for r in device_check.check_router(("float32",), (1,), lambda *_: None))


TINY_GATED_DELTA = {"tiny": (1, 2, 4, 16, 24), "odd": (2, 1, 3, 8, 40)}  # (B, Hk, Hv, Dk, Dv)


def test_gated_delta_check_passes_the_reference_and_catches_a_wrong_result(reference_only, monkeypatch):
    args = (("float32", "bfloat16"), TINY_GATED_DELTA, 3, lambda *_: None)
    rows = device_check.check_gated_delta(*args)
    assert len(rows) == 4 and all(r["ok"] and r["y_vs_reference"] == r["state_vs_reference"] == 0 for r in rows)
    right = kernels.gated_delta_step
    monkeypatch.setattr(kernels, "gated_delta_step", lambda *a: (right(*a)[0] * 1.05, right(*a)[1]))
    assert not any(r["ok"] for r in device_check.check_gated_delta(*args))
    # A state that drifts by 2e-4 of its scale is caught even when y stays within bfloat16's tolerance.
    monkeypatch.setattr(kernels, "gated_delta_step", lambda *a: (right(*a)[0], right(*a)[1] * (1 + 2e-4)))
    assert not any(r["ok"] for r in device_check.check_gated_delta(*args))


def test_gated_delta_inputs_are_as_the_model_hands_them():
    q, k, v, g, beta = device_check.gated_delta_inputs((2, 3, 6, 16, 8), mx.bfloat16, seed=0)
    assert (q.shape, k.shape, v.shape, g.shape, beta.shape) == ((2, 3, 16), (2, 3, 16), (2, 6, 8), (2, 6), (2, 6))
    assert (q.dtype, g.dtype, beta.dtype) == (mx.bfloat16, mx.float32, mx.bfloat16)
    norms = lambda a: mx.sqrt((a.astype(mx.float32) ** 2).sum(-1))
    assert mx.allclose(norms(k), mx.ones((2, 3)), atol=1e-2) and mx.allclose(norms(q), mx.full((2, 3), 0.25),
                                                                             atol=1e-2)
    assert (g < 0).all().item() and ((beta > 0) & (beta < 1)).all().item()


def test_gated_delta_bench_runs(reference_only, monkeypatch):
    monkeypatch.setattr(device_check, "time_per_call", lambda fn, operands, x: mx.eval(fn(x, *operands[0])) or 1e-6)
    rows = device_check.bench_gated_delta({"tiny": (1, 2, 4, 16, 24)}, 1000.0, lambda *_: None, copies=2)
    assert [(r["shape"], r["ours_us"], r["reference_us"]) for r in rows] == [("tiny", 1.0, 1.0)]
    state_bytes = 1 * 4 * 16 * 24 * 4
    assert rows[0]["ours_gbs"] * 1e3 > 2 * state_bytes  # bytes per µs: at least the state read and written


@pytest.mark.slow  # 7 s: every part end to end, each of which has its own default test above
def test_main_runs_every_part_and_writes_the_json(reference_only, monkeypatch, tmp_path):
    """The whole command on tiny shapes (the reference path standing in for the kernels), so that the one device
    call is not spent on a wiring mistake: every part runs, the JSON holds each part's results, exit status 0."""
    import functools
    import json

    monkeypatch.setattr(device_check, "SHAPES", {"4b q": (64, 256), "4b gate/up": (128, 256), "4b down": (64, 128)})
    monkeypatch.setattr(device_check, "EXPERT_SHAPES", {"tiny gate/up": (8, 128, 128), "tiny down": (8, 128, 64)})
    monkeypatch.setattr(device_check, "FUSED_MODELS", {"tiny": (64, 32, 96, 128)})
    monkeypatch.setattr(device_check, "GATHER_BENCH_SHAPES", {device_check.GATHER_TARGET_SHAPE: (8, 64, 128)})
    monkeypatch.setattr(device_check, "GATHER_BENCH_CASES", [(device_check.GATHER_TARGET_SHAPE, 1)])
    monkeypatch.setattr(device_check, "bench_fused", functools.partial(
        device_check.bench_fused, dense=(64, 32, 96, 128), experts=(8, 128, 128), copies=4))
    monkeypatch.setattr(device_check, "GATED_DELTA_SHAPES", TINY_GATED_DELTA)
    monkeypatch.setattr(device_check, "GATED_DELTA_BENCH_SHAPES", {"tiny": (1, 2, 4, 16, 24)})
    monkeypatch.setattr(device_check, "time_per_call", lambda fn, operands, x: mx.eval(fn(x, *operands[0])) or 1e-6)
    monkeypatch.setattr(device_check, "check_model", lambda preset, log: dict(preset=preset, ok=True))
    monkeypatch.setattr(device_check, "end_to_end", lambda preset, layers, prompt, gen, log: [dict(preset=preset)])
    out = tmp_path / "device_check.json"
    assert device_check.main(["--quick", "--json", str(out), "--prompt", "8", "--gen", "2"]) == 0
    result = json.loads(out.read_text())
    for key in ("qmatmul", "gather_qmv", "rope", "router", "gated_delta", "fused", "model", "qmatmul_bench",
                "qmatmul_crossover", "gather_qmv_bench", "rope_bench", "fused_bench", "gated_delta_bench",
                "end_to_end", "moe_end_to_end"):
        assert result[key], key
    assert [r["shape"] for r in result["gated_delta"]] == ["tiny", "tiny", "odd", "odd"]  # --quick: bf16, fp32
    assert result["failures"] == 0 and result["schema"] == "qwen-mlx-device-check/5"
    assert result["qmatmul_crossover"]["max_m"] == 8  # equal times: ours is as fast at every M
    qmatmul = result["qmatmul"]  # --quick still reaches every width, group size and dtype once
    assert {r["bits"] for r in qmatmul} == set(device_check.qmatmul_kernel.BITS)
    assert {r["group"] for r in qmatmul} == {32, 64, 128} and {r["dtype"] for r in qmatmul} == set(device_check.DTYPES)
    assert {r["m"] for r in result["qmatmul_bench"] if r["shape"] == "4b q"} == set(range(1, 9))


def test_no_baseline_reaches_our_kernels(monkeypatch):
    """On a GPU (forced here, with a stub runner recording each launch) every check and benchmark computes its
    baseline with MLX's own ops: each launch of our kernels happens inside kernels_choice("custom"), where the
    check computes ours. A baseline left outside it (say `layer(x)`) would launch our kernel with the variable
    unset, and the check would compare our kernels with themselves."""
    import os

    from qwen_mlx.kernels import dialect

    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    launches = []
    monkeypatch.setattr(dialect, "run", lambda kernel, backend, launch: launches.append(
        (kernel.name, os.environ.get(kernels.ENV))) or [mx.zeros(s, d) for s, d in zip(launch.output_shapes,
                                                                                         launch.output_dtypes)])
    monkeypatch.setattr(device_check, "time_per_call", lambda fn, operands, x: mx.eval(fn(x, *operands[0])) or 1e-6)
    quiet = lambda *_: None
    device_check.check_qmatmul((4,), (64,), ("bfloat16",), (1, 2), {"tiny": (16, 256)}, quiet)
    device_check.check_gather_qmv((4,), (64,), ("bfloat16",), (1,), TINY_EXPERTS, quiet)
    device_check.check_fused((4,), (64,), ("bfloat16",), (1, 2), {"tiny": (64, 32, 96, 128)},
                             {"tiny experts": (8, 2 * 64, 128)}, quiet)
    device_check.check_router(("bfloat16",), (1,), quiet)
    device_check.check_gated_delta(("bfloat16",), TINY_GATED_DELTA, 2, quiet)
    rope = make_rope(preset_config("qwen3-0.6b", 1))
    device_check.rope_case(rope, mx.zeros((1, 3, 4, 128)), mx.zeros((1, 3, 2, 128)), 5, None, "float32", "tiny",
                           "default")
    device_check.bench_gather_qmv(TINY_EXPERTS, [("tiny gate/up", 1)], 1000.0, quiet)
    device_check.bench_fused(quiet, dense=(64, 32, 96, 128), experts=(8, 128, 128), copies=4)
    names = {name for name, _ in launches}
    assert {"qwen_qmatmul", "qwen_gather_qmv", "qwen_qmatmul_parts3", "qwen_qmatmul_swiglu", "qwen_gather_qmv_swiglu",
            "qwen_gather_qmv_sum", "qwen_router", "qwen_rope", "qwen_gated_delta"} <= names
    assert [(name, choice) for name, choice in launches if choice != "custom"] == []


def test_crossover_is_the_last_m_of_an_unbroken_run_of_wins():
    """M = 1, 2 win on every shape and width, M = 3 loses on one, M = 4 wins again: the dispatch limit is 2."""
    speedups = {1: (2.0, 1.5), 2: (1.2, 1.0), 3: (1.4, 0.9), 4: (1.1, 1.1)}  # per M: two (shape, width) cases
    rows = [dict(shape=shape, m=m, speedup=speedup) for m, pair in speedups.items()
            for shape, speedup in zip(device_check.CROSSOVER_SHAPES, pair)]
    rows.append(dict(shape="lm head", m=1, speedup=0.5))  # not a crossover shape: not counted
    result = device_check.crossover(rows, "cuda")
    assert result["max_m"] == 2 and result["slowest_speedup_by_m"] == {1: 1.5, 2: 1.0, 3: 0.9, 4: 1.1}
    assert device_check.crossover([dict(shape="4b q", m=1, speedup=0.8)], "cuda")["max_m"] == 0


def test_custom_choice_lifts_the_dispatch_limit_for_the_checks_only(monkeypatch):
    """Inside kernels_choice("custom") the checks reach every M the kernel is built for; after it, the limit is back."""
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    limits = dict(device_check.qmatmul_kernel.DISPATCH_MAX_M)
    with device_check.kernels_choice("custom"):
        assert device_check.qmatmul_kernel.dispatched(mx.zeros((8, 64)), "cuda")
        assert kernels.BACKEND == "cuda"
    assert device_check.qmatmul_kernel.DISPATCH_MAX_M == limits
    assert not device_check.qmatmul_kernel.dispatched(mx.zeros((2, 64)), "cuda")
