"""Every kernel's own text, run on the CPU (tests/kernel_emulator.py: one std::thread per GPU thread, the warp sum
at a barrier), against the reference path it replaces: each kernel over its bits, group sizes, dtypes, row counts
and routings, then whole quantized models whose decode runs only through the emulated kernels, greedy tokens
identical to the reference path. What this cannot show (a GPU's memory model, its fast math, speed) is left to
scripts/device_check.py on a GPU.

Criterion for one product, as device_check's: with e(a, b) = max |a - b| / max |b| and `truth` the float32 product
of the dequantized weights, e(ours, truth) <= max(tol, e(mlx, truth)) and e(ours, mlx) <= tol + e(mlx, truth);
tol = 1e-5 (float32), 4e-3 (float16), 2e-2 (bfloat16): the output's rounding, plus room for another order of sums.
"""

from __future__ import annotations

import kernel_emulator
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen_mlx.kernels import dialect, projections
from qwen_mlx.kernels import gather_qmv as gather_kernel
from qwen_mlx.kernels import ops as kernels
from qwen_mlx.kernels import qmatmul as qmatmul_kernel
from qwen_mlx.kernels import rope as rope_kernel
from qwen_mlx.kernels import router as router_kernel
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.fused import fuse
from qwen_mlx.models.qwen3 import Attention, SparseMoE
from qwen_mlx.models.rope import cos_sin, make_rope, rotate_reference
from qwen_mlx.weights.loader import load_model
from qwen_mlx.weights.quant import quantize_model

pytestmark = pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed (it builds the "
                                "kernels' text for the CPU emulator)")

TOLERANCE = {mx.float32: 1e-5, mx.float16: 4e-3, mx.bfloat16: 2e-2}


def error(got: mx.array, expected: mx.array) -> float:
    expected = expected.astype(mx.float32)
    return (mx.abs(got.astype(mx.float32) - expected).max() / mx.maximum(mx.abs(expected).max(), 1e-30)).item()


def assert_close(ours: mx.array, mlx: mx.array, truth: mx.array, what: str) -> None:
    assert ours.shape == mlx.shape == truth.shape and ours.dtype == mlx.dtype, what
    tol, own = TOLERANCE[ours.dtype], error(mlx, truth)
    assert error(ours, truth) <= max(tol, own) and error(ours, mlx) <= tol + own, (
        f"{what}: vs float32 {error(ours, truth):.2e}, vs MLX {error(ours, mlx):.2e}, MLX's own {own:.2e}")


def matrix(n: int, k: int, group_size: int, bits: int, dtype, seed: int):
    """(w, scales, biases) of a random (n, k) matrix, and its dequantized float32 values."""
    w = (mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05).astype(dtype)
    q = mx.quantize(w, group_size, bits)
    return q, mx.dequantize(*q, group_size, bits).astype(mx.float32)


@pytest.fixture(params=list(kernel_emulator.BUILDS))
def build(request) -> str:
    """Each kernel test runs on both builds of the emulator: as written (-O0) and as a GPU compiler may take it
    (-O2: strict aliasing, FMA contraction)."""
    return request.param


def emulated(calls, build: str = "O2"):
    """The outputs of each (kernel, launch), run by the emulator as one translation unit."""
    return kernel_emulator.run(calls, build)


CASES = [(bits, 64, mx.float32) for bits in qmatmul_kernel.BITS]  # every width
CASES += [(4, 32, mx.bfloat16), (4, 128, mx.float16), (8, 32, mx.float16), (8, 128, mx.bfloat16)]


def test_qmatmul_equals_quantized_matmul(build):
    calls, expected = [], []
    for i, (bits, group_size, dtype) in enumerate(CASES):
        (w, scales, biases), dense = matrix(40, 384, group_size, bits, dtype, seed=i)  # 40 rows: a partial block
        for m in (1, 3, 8):
            x = mx.random.normal((m, 384), key=mx.random.key(100 + m)).astype(dtype)
            calls.append((qmatmul_kernel.KERNEL, qmatmul_kernel.launch(x, w, scales, biases, group_size, bits)))
            expected.append((mx.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits),
                             (x.astype(mx.float32) @ dense.T).astype(dtype), f"bits {bits} group {group_size} "
                             f"{dtype} M {m}"))
    for (ours,), (theirs, truth, what) in zip(emulated(calls, build), expected):
        assert_close(ours, theirs, truth, what)


@pytest.mark.parametrize("rows", [(64, 32, 32), (40, 24), (128, 16, 16)], ids=["qkv", "two-parts", "gqa-4-to-1"])
def test_parts_equal_separate_products(rows, build):
    """Q, K and V (or any 2-3 matrices of one input) in one launch: each output equals its own product, including
    parts whose rows end inside a threadgroup's block."""
    calls, expected = [], []
    for i, (bits, group_size, dtype) in enumerate([(4, 64, mx.float32), (8, 32, mx.bfloat16), (3, 128, mx.float16)]):
        parts = [matrix(n, 256, group_size, bits, dtype, seed=10 * i + j) for j, n in enumerate(rows)]
        for m in (1, 5):
            x = mx.random.normal((1, m, 256), key=mx.random.key(m)).astype(dtype)
            matrices = [q for q, _ in parts]
            assert projections.supports(x, matrices, group_size, bits)
            calls.append((projections.parts_kernel(len(rows)),
                          projections.launch_parts(x, matrices, group_size, bits)))
            expected.append([(mx.quantized_matmul(x, *q, group_size=group_size, bits=bits),
                              (x.astype(mx.float32) @ dense.T).astype(dtype)) for q, dense in parts])
    for outputs, parts in zip(emulated(calls, build), expected):
        assert len(outputs) == len(parts)
        for j, (ours, (theirs, truth)) in enumerate(zip(outputs, parts)):
            assert_close(ours, theirs, truth, f"part {j}")


def test_swiglu_equals_silu_gate_times_up(build):
    calls, expected = [], []
    for i, (bits, group_size, dtype) in enumerate([(4, 64, mx.float32), (8, 128, mx.bfloat16), (6, 32, mx.float16)]):
        (gate, gate_dense), (up, up_dense) = (matrix(72, 256, group_size, bits, dtype, seed=2 * i + j)
                                              for j in range(2))
        for m in (1, 8):
            x = mx.random.normal((m, 256), key=mx.random.key(m)).astype(dtype)
            calls.append((projections.SWIGLU_KERNEL, projections.launch_swiglu(x, gate, up, group_size, bits)))
            theirs = nn.silu(mx.quantized_matmul(x, *gate, group_size=group_size, bits=bits)) * mx.quantized_matmul(
                x, *up, group_size=group_size, bits=bits)
            x32 = x.astype(mx.float32)
            expected.append((theirs, (nn.silu(x32 @ gate_dense.T) * (x32 @ up_dense.T)).astype(dtype)))
    for (ours,), (theirs, truth) in zip(emulated(calls, build), expected):
        assert_close(ours, theirs, truth, "swiglu")


# Experts: stacks (E, N, K), decode routings of T tokens x k experts

E = 8
ROUTINGS = {"random": np.array([[3, 6], [0, 5], [7, 1]]), "all to one expert": np.full((3, 2), 5),
            "repeated": np.array([[2, 2], [2, 2], [4, 4]]), "first and last": np.array([[0, 7], [7, 0], [0, 7]])}


def experts_stack(n: int, k: int, group_size: int, bits: int, dtype, seed: int):
    w = (mx.random.normal((E, n, k), key=mx.random.key(seed)) * 0.05).astype(dtype)
    q = mx.quantize(w, group_size, bits)
    return q, mx.dequantize(*q, group_size, bits).astype(mx.float32)


def gathered_truth(x: mx.array, dense: mx.array, experts: mx.array) -> mx.array:
    """float32 x (..., 1 or k, 1, K) @ dense[experts].T -> (..., k, 1, N)."""
    return x.astype(mx.float32) @ dense[experts].swapaxes(-1, -2)


@pytest.mark.parametrize("bits,group_size,dtype", [(4, 64, mx.float32), (8, 32, mx.bfloat16), (3, 128, mx.float16)])
def test_gather_kernels_equal_gather_qmm_on_skewed_routing(bits, group_size, dtype, build):
    """gather_qmv (x shared by a token's experts, or a row per pair), its SwiGLU form on the joined gate/up stack
    and its weighted-sum form for down, on random, one-expert, repeated and first/last routings."""
    (gate_up, gate_up_dense), (down, down_dense) = (experts_stack(2 * 24, 256, group_size, bits, dtype, seed=1),
                                                    experts_stack(40, 128, group_size, bits, dtype, seed=2))
    calls, expected = [], []
    for name, routing in ROUTINGS.items():
        experts = mx.array(routing[None], mx.int32)  # (1, T, k)
        weights = mx.array(np.random.default_rng(len(name)).uniform(0, 1, routing.shape)[None], mx.float32)
        weights[0, 0, 1] = 0.0  # an expert held by another rank weighs zero (distributed.ExpertShard)
        x = mx.random.normal((1, 3, 1, 1, 256), key=mx.random.key(3)).astype(dtype)  # each token's row
        h = mx.random.normal((1, 3, 2, 1, 128), key=mx.random.key(4)).astype(dtype)  # a row per pair

        calls.append((gather_kernel.KERNEL, gather_kernel.launch(x, *gate_up, experts, group_size, bits)))
        expected.append((mx.gather_qmm(x, *gate_up, rhs_indices=experts, group_size=group_size, bits=bits),
                         gathered_truth(x, gate_up_dense, experts).astype(dtype), f"gather_qmv SHARE 2, {name}"))
        calls.append((gather_kernel.KERNEL, gather_kernel.launch(h, *down, experts, group_size, bits)))
        down_mlx = mx.gather_qmm(h, *down, rhs_indices=experts, group_size=group_size, bits=bits)
        down_truth = gathered_truth(h, down_dense, experts)
        expected.append((down_mlx, down_truth.astype(dtype), f"gather_qmv SHARE 1, {name}"))

        calls.append((gather_kernel.SWIGLU_KERNEL, gather_kernel.launch_swiglu(x, *gate_up, experts, group_size,
                                                                               bits)))
        g, u = mx.split(mx.gather_qmm(x, *gate_up, rhs_indices=experts, group_size=group_size, bits=bits), 2, -1)
        g32, u32 = mx.split(gathered_truth(x, gate_up_dense, experts), 2, -1)
        expected.append((nn.silu(g) * u, (nn.silu(g32) * u32).astype(dtype), f"gather SwiGLU, {name}"))

        calls.append((gather_kernel.SUM_KERNEL, gather_kernel.launch_sum(h, *down, experts, weights, group_size,
                                                                         bits)))
        expected.append(((down_mlx.squeeze(-2) * weights[..., None].astype(dtype)).sum(-2),
                         (down_truth.squeeze(-2) * weights[..., None]).sum(-2).astype(dtype),
                         f"gather weighted sum, {name}"))
    for (ours,), (theirs, truth, what) in zip(emulated(calls, build), expected):
        assert_close(ours, theirs, truth, what)


def tiny_config(**overrides) -> ModelConfig:
    """A one-layer config with 4 query heads and 2 KV heads of 128 (the RoPE cases' shapes)."""
    return ModelConfig.from_dict({**dict(model_type="qwen3", hidden_size=512, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                         intermediate_size=64, vocab_size=100, rope_theta=1e6), **overrides}, "test")


def test_rope_equals_the_model_page_and_the_definition(build):
    """The kernel against the page's Attention.norm_and_rotate (Qwen3 with its QK-norm weights, Qwen2 without)
    and, without the norm, against cos/sin written out."""
    rope = make_rope(tiny_config())
    calls, expected = [], []
    for dtype in rope_kernel.DTYPES:
        q = mx.random.normal((1, 3, 4, 128), key=mx.random.key(1)).astype(dtype)
        k = mx.random.normal((1, 3, 2, 128), key=mx.random.key(2)).astype(dtype)
        weights = (mx.random.uniform(0.5, 1.5, (128,)).astype(dtype),
                   mx.random.uniform(0.5, 1.5, (128,)).astype(dtype), 1e-6)
        for norms, offset in ((None, 0), (None, 4093), (weights, 7)):
            calls.append((rope_kernel.KERNEL, rope_kernel.launch(q, k, rope.inv_freq, offset, norms)))
            page = Attention(tiny_config(model_type="qwen3" if norms else "qwen2"), rope)
            if norms:
                page.q_norm.weight, page.k_norm.weight = norms[:2]
            cos, sin = cos_sin(rope, offset, 3)
            definition = None if norms else [rotate_reference(a.astype(mx.float32).transpose(0, 2, 1, 3), cos, sin)
                                             for a in (q, k)]
            expected.append((page.norm_and_rotate(q, k, offset), definition,
                             f"{dtype} offset {offset} norm {norms is not None}"))
    for ours, (reference, definition, what) in zip(emulated(calls, build), expected):
        for i, (got, want) in enumerate(zip(ours, reference)):
            tol = TOLERANCE[got.dtype] + 4e-7 * 4096  # the float32 angle's rounding grows with the position
            assert got.shape == want.shape and error(got, want) <= tol, what
            if definition:
                assert error(got, definition[i]) <= tol, what


def test_router_equals_softmax_top_k(build):
    """The chosen experts (as sets: the kernel orders them by probability, argpartition does not) and their
    weights, for 128 experts (Qwen3-MoE), 40 (a partial last lane slot) and 512, with and without renormalization."""
    calls, expected = [], []
    for dtype in router_kernel.DTYPES:
        for experts, top_k, norm in ((128, 8, True), (40, 2, False), (512, 16, True), (128, 8, False)):
            logits = (mx.random.normal((5, experts), key=mx.random.key(experts)) * 3).astype(dtype)
            calls.append((router_kernel.KERNEL, router_kernel.launch(logits, top_k, norm)))
            page = SparseMoE(tiny_config(model_type="qwen3_moe", num_experts=experts, num_experts_per_tok=top_k,
                                         moe_intermediate_size=32, norm_topk_prob=norm))
            expected.append(page.route(logits))  # the model page's router
    for (got_experts, got_weights), (experts, weights) in zip(emulated(calls, build), expected):
        order, got_order = np.argsort(np.array(experts), -1), np.argsort(np.array(got_experts), -1)
        assert (np.take_along_axis(np.array(got_experts), got_order, -1)
                == np.take_along_axis(np.array(experts), order, -1)).all()
        np.testing.assert_allclose(np.take_along_axis(np.array(got_weights), got_order, -1),
                                   np.take_along_axis(np.array(weights), order, -1), rtol=2e-6, atol=1e-7)
        assert (np.diff(np.array(got_weights), axis=-1) <= 0).all()  # by descending probability


def test_kernels_read_x_at_any_element_offset():
    """x as a row-contiguous slice one element past a 16-byte boundary, which MLX hands a kernel as it is (it
    copies only inputs that are not row-contiguous): every kernel on qmatmul's loop reads it without a vector load
    that needs alignment, and computes the same."""
    calls, expected = [], []
    for bits, dtype in ((4, mx.bfloat16), (8, mx.float32)):
        (w, scales, biases), dense = matrix(24, 256, 64, bits, dtype, seed=bits)
        up, _ = matrix(24, 256, 64, bits, dtype, seed=bits + 1)
        for m in (1, 3):
            x = mx.random.normal((m, 256), key=mx.random.key(m)).astype(dtype)
            truth = (x.astype(mx.float32) @ dense.T).astype(dtype)
            mlx = mx.quantized_matmul(x, w, scales, biases, group_size=64, bits=bits)
            calls.append((qmatmul_kernel.KERNEL, qmatmul_kernel.launch(x, w, scales, biases, 64, bits)))
            expected.append((mlx, truth))
            calls.append((projections.parts_kernel(2), projections.launch_parts(x, [(w, scales, biases), up], 64,
                                                                                bits)))
            expected.append((mlx, truth))
        (stack, stack_dense), experts = experts_stack(24, 256, 64, bits, dtype, seed=bits), mx.array([[[1, 6]]])
        x = mx.random.normal((1, 1, 1, 1, 256), key=mx.random.key(5)).astype(dtype)
        calls.append((gather_kernel.KERNEL, gather_kernel.launch(x, *stack, experts, 64, bits)))
        expected.append((mx.gather_qmm(x, *stack, rhs_indices=experts, group_size=64, bits=bits),
                         gathered_truth(x, stack_dense, experts).astype(dtype)))
    for outputs, (theirs, truth) in zip(kernel_emulator.run(calls, misaligned=("x",)), expected):
        assert_close(outputs[0], theirs, truth, "x off its alignment")


# Whole models: every decode product through the emulated kernels


@pytest.fixture
def emulated_gpu(monkeypatch):
    """kernels' GPU path with the emulator as the GPU (for a model fused for "cuda"); records the names of the
    kernels launched."""
    launched = []

    def run(kernel, backend, launch):
        launched.append(kernel.name)
        return emulated([(kernel, launch)])[0]

    monkeypatch.setattr(kernels, "BACKEND", kernels.BACKEND)  # fuse sets it: restored after the test
    monkeypatch.setattr(dialect, "run", run)
    monkeypatch.setitem(qmatmul_kernel.DISPATCH_MAX_M, "cuda", qmatmul_kernel.MAX_M)  # the prompt's M too
    return launched


def quantized_layers(path, bits: int):
    """The checkpoint's model with its decoder layers quantized (embedding and head kept in float: the real
    151,936-row head would take the emulator minutes per token)."""
    model, _ = load_model(path)
    quantize_model(model, {"group_size": 32, "bits": bits, "model.embed_tokens": False, "lm_head": False})
    return model, model.config


def greedy(model, cfg, prompt: list[int], steps: int) -> tuple[list[int], mx.array]:
    from qwen_mlx.cache.kv import make_cache

    cache = make_cache(cfg)
    logits = model(mx.array([prompt]), cache)[:, -1]
    tokens, all_logits = [], [logits]
    for _ in range(steps):
        tokens.append(logits.argmax(-1).item())
        logits = model(mx.array([[tokens[-1]]]), cache)[:, -1]
        all_logits.append(logits)
    return tokens, mx.concatenate(all_logits)


# head_dim 64 (the RoPE kernel's smallest); Qwen2.5 derives it from hidden size / heads, and has QKV bias.
MODELS = {"qwen3": dict(head_dim=64), "qwen2": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
          "qwen3_moe": dict(head_dim=64)}


@pytest.mark.parametrize("variant,bits", [("qwen3", 4), *(pytest.param(*case, marks=pytest.mark.slow)  # 15-22 s each
                                                          for case in [("qwen2", 8), ("qwen3_moe", 4), ("qwen3_moe", 8)])])
def test_greedy_tokens_with_emulated_kernels_equal_the_reference_path(tiny_checkpoint, emulated_gpu,
                                                                      variant, bits):
    model, cfg = quantized_layers(tiny_checkpoint(variant, **MODELS[variant]), bits)
    prompt = [9707, 11, 1879, 0, 358, 1079]  # 6 tokens: the prompt's products fit the kernels too (M <= 8)
    fuse(model, "cuda")
    ours, ours_logits = greedy(model, cfg, prompt, 24)
    expected = {"qwen_qmatmul_parts3", "qwen_rope", "qwen_qmatmul"}
    expected |= {"qwen_router", "qwen_gather_qmv_swiglu", "qwen_gather_qmv_sum"} if cfg.num_experts else set()
    expected |= {"qwen_qmatmul_swiglu"} if variant != "qwen3_moe" or cfg.mlp_only_layers else set()
    assert set(emulated_gpu) == expected
    fuse(model, "reference")  # the model page
    reference, reference_logits = greedy(model, cfg, prompt, 24)
    assert ours == reference and len(set(ours)) > 3
    assert error(ours_logits, reference_logits) <= 1e-4


# The emulator itself


def test_emulator_defines_every_word_of_the_dialect():
    words = lambda prelude: {line.split()[1].split("(")[0] for line in prelude.splitlines()}
    assert words(kernel_emulator.EMULATOR_PRELUDE) == words(dialect.CUDA_PRELUDE) == words(dialect.METAL_PRELUDE)


def test_emulator_catches_a_broken_kernel():
    """The weighted sum with the router's weight dropped, and qmatmul with lane 0's sum stored instead of the
    warp's: both give wrong outputs here."""
    (down, _), experts = experts_stack(40, 128, 64, 4, mx.float32, seed=2), mx.array([[[3, 6]]], mx.int32)
    h, weights = mx.random.normal((1, 1, 2, 1, 128)), mx.array([[[0.25, 0.75]]])
    (w, scales, biases), _ = matrix(40, 256, 64, 4, mx.float32, seed=0)
    x = mx.random.normal((1, 256))
    broken = [(gather_kernel.SUM_KERNEL, "total[r] += weight * acc[0][r];", "total[r] += acc[0][r];",
               gather_kernel.launch_sum(h, *down, experts, weights, 64, 4)),
              (qmatmul_kernel.KERNEL, "const float total = WARP_SUM(acc[m][r]);", "const float total = acc[m][r];",
               qmatmul_kernel.launch(x, w, scales, biases, 64, 4))]
    calls = []
    for kernel, old, new, launch in broken:
        assert old in kernel.body
        calls += [(kernel, launch), (dialect.Kernel(kernel.name + "_broken", kernel.inputs, kernel.outputs,
                                                    kernel.body.replace(old, new)), launch)]
    outputs = emulated(calls)
    for i in range(0, len(outputs), 2):
        assert error(outputs[i + 1][0], outputs[i][0]) > 0.1


def test_emulator_outputs_start_uninitialised():
    """MLX does not clear a kernel's outputs: an element the kernel never writes is NaN here, not a lucky zero."""
    evens = dialect.Kernel("evens", ("x",), ("y",), "if (LANE % 2 == 0) { y[LANE] = x[LANE]; }")
    launch = dialect.Launch([mx.ones(32)], [], (32, 1, 1), (32, 1, 1), [(32,)], [mx.float32])
    (y,), = emulated([(evens, launch)])
    assert mx.all(y[::2] == 1).item() and mx.all(mx.isnan(y[1::2])).item()


def test_emulator_warp_sum_adds_in_cuda_butterfly_order():
    """Lane i adds lane i ^ 16's value, then i ^ 8's, ... (the CUDA header's shuffles); with values whose float32
    sum depends on the order, every lane gets that order's sum, not the sequential one."""
    values = np.array([2.0 ** 24, 1.0, -(2.0 ** 24), 1.0] * 8, np.float32)
    level = values.copy()
    for step in (16, 8, 4, 2, 1):
        level = (level + level[np.arange(32) ^ step]).astype(np.float32)
    sequential = np.float32(0)
    for v in values:
        sequential = np.float32(sequential + v)
    assert level[0] != sequential  # the case tells the orders apart
    warp_sum = dialect.Kernel("warp_sum", ("x",), ("y",), "y[LANE] = WARP_SUM(x[LANE]);")
    launch = dialect.Launch([mx.array(values)], [], (32, 1, 1), (32, 1, 1), [(32,)], [mx.float32])
    (y,), = emulated([(warp_sum, launch)])
    assert np.array_equal(np.array(y), level)


def test_emulator_builds_with_and_without_fma_contraction():
    """a * a - b with a = 1 + 2^-12 and b = a * a rounded to float: 0 as written (-O0), the product's rounding
    error 2^-24 when contracted into one FMA (-O2, as GPU compilers do by default)."""
    fma = dialect.Kernel("fma", ("x",), ("y",), "y[LANE] = x[0] * x[0] - x[1];")
    a = np.float32(1 + 2.0 ** -12)
    launch = dialect.Launch([mx.array(np.array([a, a * a], np.float32))], [], (32, 1, 1), (32, 1, 1), [(32,)],
                            [mx.float32])
    assert {build: emulated([(fma, launch)], build)[0][0][0].item() for build in ("O0", "O2")} == {
        "O0": 0.0, "O2": 2.0 ** -24}


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_next"])
def test_hybrid_greedy_tokens_with_the_emulated_gated_delta_kernel_equal_the_page(hybrid_checkpoint, emulated_gpu,
                                                                                 variant):
    """A tiny hybrid model fused for a GPU decodes every linear-attention token through the gated-delta kernel's
    own text (emulated): the same greedy tokens as the model page, logits within 1e-4."""
    model, _ = load_model(hybrid_checkpoint(variant))
    cfg = model.config
    prompt = [9707, 11, 1879, 0, 358, 1079]
    fuse(model, "cuda")
    ours, ours_logits = greedy(model, cfg, prompt, 16)
    assert "qwen_gated_delta" in set(emulated_gpu)
    assert emulated_gpu.count("qwen_gated_delta") >= 16 * sum(map(cfg.is_linear_layer, range(cfg.num_hidden_layers)))
    fuse(model, "reference")
    reference, reference_logits = greedy(model, cfg, prompt, 16)
    assert ours == reference and len(set(ours)) > 3
    assert error(ours_logits, reference_logits) <= 1e-4
