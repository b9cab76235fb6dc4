"""Kernels without a GPU: backend choice, the reference path against MLX's built-ins, the dispatch to a kernel,
the packed layout the kernel decodes, and each kernel's CUDA build (nvcc) and Metal build (clang, stub header)
compiled from the very text MLX would hand to NVRTC or Metal. The kernels' text run on the CPU:
test_kernel_emulation.py. Correctness on a GPU: scripts/device_check.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_sources import cuda_source, metal_source

from qwen_mlx.errors import UserError
from qwen_mlx.kernels import dialect, projections
from qwen_mlx.kernels import gated_delta as gated_delta_kernel
from qwen_mlx.kernels import gather_qmv as gather_kernel
from qwen_mlx.kernels import ops as kernels
from qwen_mlx.kernels import qmatmul as qmatmul_kernel
from qwen_mlx.kernels import rope as rope_kernel
from qwen_mlx.kernels import router as router_kernel
from qwen_mlx.kernels.dialect import Kernel
from qwen_mlx.kernels.quantized import QuantizedLinear
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.fused import FusedQuantizedEmbedding, FusedQuantizedLinear, fuse
from qwen_mlx.models.qwen3 import Attention, Block, SparseMoE, SwitchMLP
from qwen_mlx.models.rope import Rope, cos_sin, make_rope, rotate_reference
from qwen_mlx.weights.quant import quantize_model

STUBS = Path(__file__).parent / "kernel_stubs"


def quantized(n: int, k: int, group_size: int, bits: int, dtype=mx.bfloat16, seed: int = 0):
    w = (mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05).astype(dtype)
    return w, *mx.quantize(w, group_size, bits)


def quantized_experts(experts: int, n: int, k: int, group_size: int, bits: int, dtype=mx.bfloat16, seed: int = 0):
    """A stack of expert weights (experts, n, k) as mx.quantize leaves it: w, scales, biases."""
    w = (mx.random.normal((experts, n, k), key=mx.random.key(seed)) * 0.05).astype(dtype)
    return mx.quantize(w, group_size, bits)


def qwen_rope(head_dim: int = 128) -> Rope:
    inv_freq = 1.0 / 1e6 ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
    return Rope(inv_freq, 1.0, 1.0 / inv_freq)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**dict(model_type="qwen3", hidden_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                         intermediate_size=256, vocab_size=100, rope_theta=1e6), **overrides}, "test")


# Backend choice


def test_backend_is_reference_on_cpu_and_follows_the_override(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.choose_backend() == "reference"
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    assert kernels.choose_backend() == "cuda"
    monkeypatch.setenv(kernels.ENV, "custom")
    assert kernels.choose_backend() == "cuda"
    monkeypatch.setenv(kernels.ENV, "reference")
    assert kernels.choose_backend() == "reference"


def test_backend_override_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(UserError, match="QWEN_MLX_KERNELS='fast'"):
        kernels.choose_backend()
    monkeypatch.setenv(kernels.ENV, "custom")
    with pytest.raises(UserError, match="QWEN_MLX_KERNELS=custom needs a Metal or CUDA GPU"):
        kernels.choose_backend()


# The reference path equals MLX's built-ins


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (3, 128)])
def test_reference_qmatmul_is_quantized_matmul(bits, group_size):
    _, w, scales, biases = quantized(48, 256, group_size, bits)
    x = mx.random.normal((2, 3, 256), key=mx.random.key(1)).astype(mx.bfloat16)
    expected = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
    assert mx.array_equal(kernels.qmatmul(x, w, scales, biases, group_size, bits), expected)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (3, 128)])
def test_reference_gather_qmm_is_gather_qmm(bits, group_size):
    w, scales, biases = quantized_experts(6, 48, 256, group_size, bits)
    experts = mx.array([[[0, 5], [3, 3]]], mx.uint32)  # (B 1, L 2, k 2), a token with one expert twice
    for x in (mx.random.normal((1, 2, 1, 1, 256), key=mx.random.key(1)),  # each token's row, for its k experts
              mx.random.normal((1, 2, 2, 1, 256), key=mx.random.key(2))):  # a row per (token, expert)
        x = x.astype(mx.bfloat16)
        for sorted_experts in (False, True):
            expected = mx.gather_qmm(x, w, scales, biases, rhs_indices=experts, transpose=True,
                                     group_size=group_size, bits=bits, sorted_indices=sorted_experts)
            got = kernels.gather_qmm(x, w, scales, biases, experts, group_size, bits, sorted_experts)
            assert got.shape == (1, 2, 2, 1, 48) and mx.array_equal(got, expected)


def test_fused_quantized_layers_on_the_reference_backend_match_mlx_layers():
    linear = nn.Linear(128, 40, bias=True)
    ours, theirs = FusedQuantizedLinear.from_linear(linear, 64, 4), nn.QuantizedLinear.from_linear(linear, 64, 4)
    theirs.bias = ours.bias = linear.bias
    x = mx.random.normal((2, 5, 128), key=mx.random.key(2))
    assert mx.array_equal(ours(x), theirs(x))
    embedding = nn.Embedding(40, 128)
    ours, theirs = FusedQuantizedEmbedding.from_embedding(embedding, 64, 8), nn.QuantizedEmbedding.from_embedding(
        embedding, 64, 8)
    assert mx.array_equal(ours.as_linear(x), theirs.as_linear(x))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_model_qk_norm_and_rope_is_rms_norm_per_head_then_rotation(model_type):
    """The page's Attention.norm_and_rotate against the definition: each head of q and k divided by its RMS and
    times its weight (Qwen3 only), then rotated by position * inv_freq, heads first."""
    cfg = tiny_config(model_type=model_type, head_dim=128, hidden_size=512)
    attention = Attention(cfg, make_rope(cfg))
    if "q_norm" in attention:
        attention.q_norm.weight = mx.random.uniform(0.5, 1.5, (128,), key=mx.random.key(1))
        attention.k_norm.weight = mx.random.uniform(0.5, 1.5, (128,), key=mx.random.key(2))
    q = mx.random.normal((2, 5, 4, 128), key=mx.random.key(3))
    k = mx.random.normal((2, 5, 2, 128), key=mx.random.key(4))
    got_q, got_k = attention.norm_and_rotate(q, k, 7)
    cos, sin = cos_sin(make_rope(cfg), 7, 5)
    for got, x, norm in ((got_q, q, attention.get("q_norm")), (got_k, k, attention.get("k_norm"))):
        if norm is not None:
            x = x * mx.rsqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * norm.weight
        assert got.shape == (x.shape[0], x.shape[2], x.shape[1], 128)
        assert mx.abs(got - rotate_reference(x.transpose(0, 2, 1, 3), cos, sin)).max().item() < 1e-4


# Dispatch: what a GPU backend hands to the kernel, and what it leaves to MLX


def kernel_calls(monkeypatch, backend: str) -> list[tuple[Kernel, str, dialect.Launch]]:
    """The kernel launches a GPU `backend` would make, recorded; each returns zeros of its outputs' shapes."""
    calls = []
    monkeypatch.setattr(kernels, "BACKEND", backend)
    monkeypatch.setattr(dialect, "run", lambda kernel, backend, launch: calls.append((kernel, backend, launch))
                        or [mx.zeros(s, d) for s, d in zip(launch.output_shapes, launch.output_dtypes)])
    return calls


def test_gpu_backend_launches_the_kernel_up_to_the_dispatch_limit(monkeypatch):
    """The kernel is built for M <= 8; dispatch takes M up to the backend's measured crossover (1 until measured)."""
    calls = kernel_calls(monkeypatch, "cuda")
    _, w, scales, biases = quantized(100, 512, 64, 4)
    assert qmatmul_kernel.DISPATCH_MAX_M == {"metal": 1, "cuda": 1}
    kernels.qmatmul(mx.zeros((1, 1, 512), mx.bfloat16), w, scales, biases, 64, 4)
    assert [dict(launch.template)["M"] for _, _, launch in calls] == [1]
    kernels.qmatmul(mx.zeros((2, 512), mx.bfloat16), w, scales, biases, 64, 4)  # past the limit: MLX's op
    assert len(calls) == 1
    monkeypatch.setitem(qmatmul_kernel.DISPATCH_MAX_M, "cuda", 8)  # as set from device_check's crossover
    x = mx.zeros((2, 4, 512), mx.bfloat16)
    assert kernels.qmatmul(x, w, scales, biases, 64, 4).shape == (2, 4, 100)
    kernel, backend, launch = calls[-1]
    assert (kernel, backend) == (qmatmul_kernel.KERNEL, "cuda")
    assert dict(launch.template) == {"T": mx.bfloat16, "BITS": 4, "GROUP": 64, "M": 8, "ROWS": 4, "WARPS": 2}
    rows_per_group = qmatmul_kernel.ROWS * qmatmul_kernel.WARPS
    assert launch.grid == (-(-100 // rows_per_group) * 64, 1, 1) and launch.threadgroup == (64, 1, 1)
    assert launch.inputs[0].shape == (8, 512)
    n = len(calls)
    kernels.qmatmul(mx.zeros((9, 512), mx.bfloat16), w, scales, biases, 64, 4)  # M > 8: MLX's tiled kernel
    fp_w, fp_scales = mx.quantize(mx.zeros((100, 512)), 32, 4, mode="mxfp4")
    kernels.qmatmul(mx.zeros((1, 512), mx.bfloat16), fp_w, fp_scales, None, 32, 4, "mxfp4")  # not affine
    assert len(calls) == n


def test_gpu_backend_launches_gather_qmv_for_decode_only(monkeypatch):
    calls = kernel_calls(monkeypatch, "cuda")
    w, scales, biases = quantized_experts(16, 100, 512, 64, 4)
    experts = mx.zeros((1, 8, 8), mx.int32)  # 8 decode tokens, 8 experts each: 64 pairs
    x = mx.zeros((1, 8, 1, 1, 512), mx.bfloat16)  # each token's row, for its 8 experts (the experts' gate/up)
    assert kernels.gather_qmm(x, w, scales, biases, experts, 64, 4, False).shape == (1, 8, 8, 1, 100)
    kernel, backend, launch = calls[-1]
    assert (kernel, backend) == (gather_kernel.KERNEL, "cuda")
    assert dict(launch.template) == {"T": mx.bfloat16, "I": mx.int32, "BITS": 4, "GROUP": 64, "SHARE": 8, "ROWS": 4,
                                     "WARPS": 2}
    rows_per_group = qmatmul_kernel.ROWS * qmatmul_kernel.WARPS
    assert launch.grid == (64 * -(-100 // rows_per_group) * 64, 1, 1) and launch.threadgroup == (64, 1, 1)
    assert launch.inputs[0].shape == (8, 512) and launch.inputs[-1].shape == (64,)
    x = mx.zeros((1, 1, 4, 1, 512), mx.float16)  # a row per (token, expert) (the experts' down)
    kernels.gather_qmm(x, w, scales, biases, experts[:, :1, :4].astype(mx.uint32), 64, 4, False)
    template = dict(calls[-1][2].template)
    assert (template["T"], template["I"], template["SHARE"]) == (mx.float16, mx.uint32, 1)
    n = len(calls)
    many = mx.zeros((1, 9, 8), mx.int32)  # 72 pairs: a prefill, mx.gather_qmm's sorted matmul
    kernels.gather_qmm(mx.zeros((1, 9, 1, 1, 512), mx.bfloat16), w, scales, biases, many, 64, 4, False)
    kernels.gather_qmm(mx.zeros((1, 1, 1, 2, 512), mx.bfloat16), w, scales, biases, experts[:, :1], 64, 4,
                       False)  # two x rows per pair
    kernels.gather_qmm(mx.zeros((1, 8, 1, 1, 512), mx.bfloat16), w, scales, biases, experts.astype(mx.int64), 64,
                       4, False)  # an index dtype the kernel is not built for
    fp_w, fp_scales = mx.quantize(mx.zeros((16, 100, 512)), 32, 4, mode="mxfp4")
    kernels.gather_qmm(mx.zeros((1, 1, 1, 1, 512), mx.bfloat16), fp_w, fp_scales, None, experts[:, :1], 32, 4,
                       False, "mxfp4")  # not affine
    assert len(calls) == n


@pytest.mark.parametrize("tokens", [1, 48], ids=["decode", "sorted-prefill"])
def test_quantized_experts_take_two_fused_launches_at_decode(monkeypatch, tokens):
    layer = nn.Module()
    layer.switch_mlp = SwitchMLP(128, 64, 8)  # under its checkpoint name, as in a model
    quantize_model(layer, {"group_size": 32, "bits": 4})
    calls = kernel_calls(monkeypatch, "metal")
    fuse(layer, "metal")
    mlp = layer.switch_mlp
    experts = mx.array(np.random.default_rng(0).integers(0, 8, (1, tokens, 2)), mx.uint32)
    assert mlp(mx.zeros((1, tokens, 128)), experts, mx.ones((1, tokens, 2))).shape == (1, tokens, 128)
    if tokens > 1:  # 96 pairs: a prefill, mx.gather_qmm's sorted matmul
        assert calls == []
        return
    (swiglu, _, first), (total, _, second) = calls  # silu(gate) * up, then down weighted and summed
    assert (swiglu, total) == (gather_kernel.SWIGLU_KERNEL, gather_kernel.SUM_KERNEL)
    assert dict(first.template)["SHARE"] == 2 and first.output_shapes == [(1, 1, 2, 1, 64)]
    assert dict(second.template)["TOP"] == 2 and second.output_shapes == [(1, 1, 128)]
    assert second.inputs[-1].dtype == mx.float32  # the router's weights


def test_quantized_attention_and_mlp_take_one_launch_each_for_qkv_and_gate_up(monkeypatch):
    cfg = tiny_config()
    calls = kernel_calls(monkeypatch, "cuda")
    block = Block(cfg, make_rope(cfg), 0)
    quantize_model(block, {"group_size": 64, "bits": 4})
    fuse(block, "cuda")
    block(mx.zeros((1, 1, 128)), None)
    assert [kernel.name for kernel, _, _ in calls] == ["qwen_qmatmul_parts3", "qwen_rope", "qwen_qmatmul",
                                                       "qwen_qmatmul_swiglu", "qwen_qmatmul"]  # o, then down
    assert calls[0][2].output_shapes == [(1, 1, 256), (1, 1, 128), (1, 1, 128)]

    # Q, K, V quantized differently (a mixed recipe), or float: each layer on its own
    calls.clear()
    mixed = Block(cfg, make_rope(cfg), 0)
    quantize_model(mixed, {"group_size": 64, "bits": 4, "self_attn.v_proj": {"group_size": 64, "bits": 8}})
    fuse(mixed, "cuda")
    mixed(mx.zeros((1, 1, 128)), None)
    assert [kernel.name for kernel, _, _ in calls][:3] == ["qwen_qmatmul"] * 3
    calls.clear()
    float_block = Block(cfg, make_rope(cfg), 0)
    fuse(float_block, "cuda")
    float_block(mx.zeros((1, 1, 128)), None)
    assert [kernel.name for kernel, _, _ in calls] == ["qwen_rope"]

    # Two tokens: past the dispatch limit (1 until measured), every product is MLX's
    calls.clear()
    block(mx.zeros((1, 2, 128)), None)
    assert [kernel.name for kernel, _, _ in calls] == ["qwen_rope"]


def test_fused_ops_leave_layers_that_are_not_ours_to_their_own_call(monkeypatch):
    """A layer swapped in from elsewhere (mlx's QuantizedLinear here; a distributed shard in use) may compute more
    than its product: the fused ops call it instead of reading its weights."""
    calls = kernel_calls(monkeypatch, "cuda")
    theirs = [nn.QuantizedLinear(128, 64, bias=False, group_size=64, bits=4) for _ in range(3)]
    x = mx.ones((1, 128))
    assert [y.shape for y in kernels.linears(x, *theirs)] == [(1, 64)] * 3
    assert kernels.swiglu(x, *theirs[:2]).shape == (1, 64)
    assert calls == []


def test_reference_fused_ops_equal_their_definitions():
    layers = [QuantizedLinear.from_linear(nn.Linear(128, n, bias=bias), 64, 4) for n, bias in ((64, True),
                                                                                              (32, False))]
    x = mx.random.normal((2, 128))
    for got, layer in zip(kernels.linears(x, *layers), layers):
        assert mx.array_equal(got, layer(x))
    gate, up = (QuantizedLinear.from_linear(nn.Linear(128, 64, bias=False), 64, 4) for _ in range(2))
    assert mx.array_equal(kernels.swiglu(x, gate, up), nn.silu(gate(x)) * up(x))


def moe_layer(num_experts: int, top_k: int, norm: bool) -> SparseMoE:
    return SparseMoE(tiny_config(model_type="qwen3_moe", num_experts=num_experts, num_experts_per_tok=top_k,
                                 moe_intermediate_size=32, norm_topk_prob=norm))


def test_gpu_backend_routes_in_one_launch(monkeypatch):
    calls = kernel_calls(monkeypatch, "cuda")
    moe = moe_layer(128, 8, True)
    fuse(moe, "cuda")
    experts, weights = moe.route(mx.zeros((1, 5, 128), mx.bfloat16))
    assert (experts.shape, experts.dtype, weights.shape, weights.dtype) == ((1, 5, 8), mx.uint32, (1, 5, 8),
                                                                            mx.float32)
    ((kernel, _, launch),) = calls
    assert kernel == router_kernel.KERNEL and launch.grid == (5 * 32, 1, 1)
    assert dict(launch.template) == {"T": mx.bfloat16, "E": 128, "TOP_K": 8, "NORM": True}
    for moe in (moe_layer(1024, 8, True), moe_layer(64, 32, True)):  # more experts than a warp holds; top-k past
        fuse(moe, "cuda")  # the kernel's registers: the page's own ops
        experts, _ = moe.route(mx.zeros((1, 1, moe.gate.weight.shape[0])))
        assert experts.shape == (1, 1, moe.top_k)
    assert len(calls) == 1


def test_model_route_is_softmax_top_k():
    logits = mx.random.normal((2, 3, 16), key=mx.random.key(0))
    for norm in (True, False):
        experts, weights = moe_layer(16, 4, norm).route(logits)
        probs = np.array(mx.softmax(logits, axis=-1))
        top = np.sort(np.argsort(-probs, axis=-1)[..., :4], axis=-1)
        assert (np.sort(np.array(experts), axis=-1) == top).all()
        expected = np.take_along_axis(probs, np.array(experts).astype(np.int64), -1)
        expected = expected / expected.sum(-1, keepdims=True) if norm else expected
        np.testing.assert_allclose(np.array(weights), expected, rtol=1e-6)


def test_gpu_backend_launches_one_rope_for_q_and_k(monkeypatch):
    calls = kernel_calls(monkeypatch, "metal")
    q, k = mx.zeros((1, 3, 32, 128), mx.float16), mx.zeros((1, 3, 8, 128), mx.float16)
    out_q, out_k = kernels.rope(q, k, qwen_rope().inv_freq, offset=11, norms=(mx.ones(128), mx.ones(128), 1e-6))
    assert out_q.shape == (1, 32, 3, 128) and out_k.shape == (1, 8, 3, 128)
    ((kernel, _, launch),) = calls
    assert kernel == rope_kernel.KERNEL
    assert dict(launch.template) == {"T": mx.float16, "D": 128, "NORM": True, "WARPS": 4}
    assert launch.inputs[-1].tolist() == [11] and launch.grid == (3 * 40 // 4 * 128, 1, 1)


def test_gpu_backend_leaves_a_batched_decode_steps_offsets_to_the_page(monkeypatch):
    """One position per sequence (the server's batched decode step): the page's mx.fast.rope, not the kernel."""
    calls = kernel_calls(monkeypatch, "cuda")
    block = Block(tiny_config(), make_rope(tiny_config()), 0)
    fuse(block, "cuda")
    q, k = mx.zeros((2, 1, 4, 64)), mx.zeros((2, 1, 2, 64))
    out_q, out_k = block.self_attn.norm_and_rotate(q, k, mx.array([3, 7]))
    assert (out_q.shape, out_k.shape) == ((2, 4, 1, 64), (2, 2, 1, 64)) and calls == []
    block.self_attn.norm_and_rotate(q, k, 5)
    assert [kernel.name for kernel, _, _ in calls] == ["qwen_rope"]


# The packed layout the kernel decodes: value i of a row at bits [bits * i, bits * (i + 1)) of its words


@pytest.mark.parametrize("bits", qmatmul_kernel.BITS)
def test_kernel_reads_mlx_packed_layout(bits):
    for group_size in qmatmul_kernel.GROUP_SIZES:
        _, w, scales, biases = quantized(8, 384, group_size, bits, mx.float32)
        words = np.array(w).astype(np.uint64)
        k = words.shape[1] * 32 // bits
        i = np.arange(k)
        word, shift = i * bits // 32, (i * bits % 32).astype(np.uint64)
        padded = np.concatenate([words, np.zeros((8, 1), np.uint64)], axis=1)  # the kernel's straddling read
        q = (padded[:, word] >> shift) | (padded[:, word + 1] << (np.uint64(32) - shift))
        q &= np.uint64((1 << bits) - 1)
        dequantized = q * np.repeat(np.array(scales), group_size, 1) + np.repeat(np.array(biases), group_size, 1)
        np.testing.assert_allclose(dequantized, np.array(mx.dequantize(w, scales, biases, group_size, bits)),
                                   atol=1e-6)


# Each kernel's CUDA build compiles with nvcc, its Metal build passes clang's syntax check


def qmatmul_launches():
    cases = [(bits, 64, mx.bfloat16, 1) for bits in qmatmul_kernel.BITS]
    cases += [(4, 32, mx.float16, 1), (4, 128, mx.float32, 1), (4, 64, mx.bfloat16, 8), (8, 128, mx.float32, 8)]
    for bits, group_size, dtype, m in cases:
        _, w, scales, biases = quantized(16, 768, group_size, bits)
        yield qmatmul_kernel.launch(mx.zeros((m, 768), dtype), w, scales, biases, group_size, bits)


def rope_launches():
    for dtype in rope_kernel.DTYPES:
        for norms in (None, (mx.ones(128), mx.ones(128), 1e-6)):
            q, k = mx.zeros((1, 2, 16, 128), dtype), mx.zeros((1, 2, 8, 128), dtype)
            yield rope_kernel.launch(q, k, qwen_rope().inv_freq, 5, norms)


def gather_qmv_launches():
    """Bits 4/8 x dtypes x 1 and 8 decode tokens of 8 experts each, x shared by a token's experts (gate/up) or a row
    per pair (down); the other widths once. The token count sets only the grid: T 1 and 8 give one text."""
    cases = [(bits, 64, dtype, tokens) for bits in (4, 8) for dtype in qmatmul_kernel.DTYPES for tokens in (1, 8)]
    cases += [(bits, 64, mx.bfloat16, 1) for bits in qmatmul_kernel.BITS if bits not in (4, 8)]
    cases += [(4, 32, mx.float16, 1), (8, 128, mx.float32, 8)]
    for bits, group_size, dtype, tokens in cases:
        w, scales, biases = quantized_experts(4, 16, 768, group_size, bits)
        for x_rows, index_dtype in ((1, mx.int32), (8, mx.uint32)):
            x, experts = mx.zeros((1, tokens, x_rows, 1, 768), dtype), mx.zeros((1, tokens, 8), index_dtype)
            yield gather_kernel.launch(x, w, scales, biases, experts, group_size, bits)
    # Two experts of one token: fewer than 8 indices, which Metal passes in the constant address space.
    w, scales, biases = quantized_experts(4, 16, 768, 64, 4)
    yield gather_kernel.launch(mx.zeros((1, 1, 1, 1, 768)), w, scales, biases, mx.zeros((1, 1, 2), mx.int32), 64, 4)


def parts_launches(parts: int):
    def launches():
        for bits, group_size, dtype, m in ((4, 64, mx.bfloat16, 1), (8, 128, mx.float16, 1), (3, 32, mx.float32, 8),
                                           (4, 64, mx.bfloat16, 8)):
            matrices = [quantized(n, 768, group_size, bits, seed=n)[1:] for n in (32, 16, 16)[:parts]]
            yield projections.launch_parts(mx.zeros((m, 768), dtype), matrices, group_size, bits)
    return launches


def swiglu_launches():
    for bits, group_size, dtype, m in ((4, 64, mx.bfloat16, 1), (8, 128, mx.float16, 1), (6, 32, mx.float32, 8),
                                       (4, 64, mx.bfloat16, 8)):
        gate, up = (quantized(24, 768, group_size, bits, seed=seed)[1:] for seed in (1, 2))
        yield projections.launch_swiglu(mx.zeros((m, 768), dtype), gate, up, group_size, bits)


def gather_fused_launches(fused: str):
    """gather_qmv's SwiGLU form (x shared by a token's experts) or weighted-sum form (a row per pair), bits 4/8
    x dtypes, 8 experts per token, and 2 (fewer than 8 indices and weights: Metal's constant address space)."""
    def launches():
        for bits, dtype in [(bits, dtype) for bits in (4, 8) for dtype in qmatmul_kernel.DTYPES] + [(3, mx.float16)]:
            w, scales, biases = quantized_experts(4, 32, 768, 64, bits)
            for top in (8, 2):
                experts = mx.zeros((1, 1, top), mx.int32 if top == 8 else mx.uint32)
                if fused == "swiglu":
                    yield gather_kernel.launch_swiglu(mx.zeros((1, 1, 1, 1, 768), dtype), w, scales, biases, experts,
                                                      64, bits)
                else:
                    yield gather_kernel.launch_sum(mx.zeros((1, 1, top, 1, 768), dtype), w, scales, biases, experts,
                                                   mx.ones((1, 1, top)), 64, bits)
    return launches


def router_launches():
    for dtype in router_kernel.DTYPES:
        for experts, top_k, norm in ((128, 8, True), (40, 2, False), (512, 16, True)):
            yield router_kernel.launch(mx.zeros((3, experts), dtype), top_k, norm)


def gated_delta_launches():
    """Qwen3.5-35B-A3B's shapes (16 key heads, 32 value heads, 128 x 128) in each dtype with g float32, and odd
    shapes (a partial block of columns, Dk != Dv, 3 value heads per key head, g and beta in other dtypes, inputs of
    fewer than 8 elements: Metal's constant address space)."""
    for dtype in gated_delta_kernel.DTYPES:
        for b, hk, hv, dk, dv, g_dtype, beta_dtype in ((1, 16, 32, 128, 128, mx.float32, dtype),
                                                       (2, 1, 3, 24, 40, dtype, mx.float32),
                                                       (1, 1, 1, 3, 2, mx.float32, dtype)):
            yield gated_delta_kernel.launch(mx.zeros((b, hk, dk), dtype), mx.zeros((b, hk, dk), dtype),
                                            mx.zeros((b, hv, dv), dtype), mx.zeros((b, hv), g_dtype),
                                            mx.zeros((b, hv), beta_dtype), mx.zeros((b, hv, dk, dv)))


LAUNCHES = {"qmatmul": (qmatmul_kernel.KERNEL, qmatmul_launches), "rope": (rope_kernel.KERNEL, rope_launches),
            "router": (router_kernel.KERNEL, router_launches),
            "gated_delta": (gated_delta_kernel.KERNEL, gated_delta_launches),
            "gather_qmv": (gather_kernel.KERNEL, gather_qmv_launches),
            "qmatmul_parts2": (projections.parts_kernel(2), parts_launches(2)),
            "qmatmul_parts3": (projections.parts_kernel(3), parts_launches(3)),
            "qmatmul_swiglu": (projections.SWIGLU_KERNEL, swiglu_launches),
            "gather_qmv_swiglu": (gather_kernel.SWIGLU_KERNEL, gather_fused_launches("swiglu")),
            "gather_qmv_sum": (gather_kernel.SUM_KERNEL, gather_fused_launches("sum"))}
QUANTIZED = [name for name in LAUNCHES if name not in ("rope", "router", "gated_delta")]  # built on qmatmul's shared loop
BROKEN = Kernel("broken", ("x",), ("y",), "y[LANE] = x[LANE] + undeclared_name;")


def nvcc(sources: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (the CUDA toolkit compiles the kernels' CUDA build)")
    cu = tmp_path / "kernels.cu"
    cu.write_text("".join(sources))  # each text is exactly MLX's, so several can share one translation unit
    return subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-I", str(STUBS / "cuda"), "-o",
                           str(tmp_path / "kernels.cubin"), str(cu)], capture_output=True, text=True)


@pytest.mark.parametrize("name", [n if n == "qmatmul" else pytest.param(n, marks=pytest.mark.slow)  # 7-15 s each
                                  for n in LAUNCHES])
def test_cuda_build_compiles_for_hopper_without_spills(name, tmp_path):
    kernel, launches = LAUNCHES[name]
    sources = list(dict.fromkeys(cuda_source(kernel, launch) for launch in launches()))  # each text once
    result = nvcc(sources, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = result.stdout + result.stderr
    assert len(re.findall(r"Compiling entry function", report)) == len(sources)
    assert set(re.findall(r"(\d+) bytes spill stores", report)) == {"0"}, report[-4000:]


def test_nvcc_check_catches_a_broken_kernel(tmp_path):
    launch = dialect.Launch([mx.zeros(64)], [], (64, 1, 1), (64, 1, 1), [(64,)], [mx.float32])
    result = nvcc([cuda_source(BROKEN, launch)], tmp_path)
    assert result.returncode != 0 and "undeclared_name" in result.stderr


def without_const_x(kernel: Kernel) -> Kernel:
    """`kernel` with x's read pointer no longer const: a type error in both languages, inside the shared loop's
    prologue."""
    assert "const GLOBAL T* x_rows = x" in kernel.body
    return Kernel(kernel.name, kernel.inputs, kernel.outputs, kernel.body.replace("const GLOBAL T* x_rows = x",
                                                                                  "GLOBAL T* x_rows = x"))


@pytest.mark.parametrize("name", [name if name in ("qmatmul", "gather_qmv") else  # 1-1.5 s each: nvcc
                                  pytest.param(name, marks=pytest.mark.slow) for name in QUANTIZED])
def test_nvcc_check_catches_a_broken_variant_of_the_kernel(name, tmp_path):
    kernel, launches = LAUNCHES[name]
    result = nvcc([cuda_source(without_const_x(kernel), next(launches()))], tmp_path)
    assert result.returncode != 0 and "x_rows" in result.stderr


def clang_errors(kernel: Kernel, launch: dialect.Launch) -> list[str]:
    try:
        from clang import cindex
    except ImportError:
        pytest.skip("clang's Python bindings are not installed: pip install libclang (in the dev extra)")
    text = metal_source(kernel, launch, '#include "metal_stub.h"\n')
    # Metal's clang takes attributes on an explicit instantiation; standard C++ does not: drop them there only.
    text = re.sub(r'template \[\[host_name\("\w+"\)\]\] \[\[kernel\]\]', "template", text)
    unit = cindex.Index.create().parse("kernel.metal.cpp", args=["-x", "c++", "-std=c++17", "-I", str(STUBS)],
                                       unsaved_files=[("kernel.metal.cpp", text)])
    return [f"line {d.location.line}: {d.spelling}" for d in unit.diagnostics
            if d.severity >= cindex.Diagnostic.Error]


@pytest.mark.parametrize("name", LAUNCHES)
def test_metal_build_passes_clang_syntax_check(name):
    kernel, launches = LAUNCHES[name]
    for launch in launches():
        assert clang_errors(kernel, launch) == [], dict(launch.template)


def test_clang_check_catches_a_broken_kernel():
    launch = dialect.Launch([mx.zeros(64)], [], (64, 1, 1), (64, 1, 1), [(64,)], [mx.float32])
    assert any("undeclared_name" in e for e in clang_errors(BROKEN, launch))
    cuda_only = Kernel("cuda_only", ("x",), ("y",), "y[LANE] = __shfl_xor_sync(0xffffffffu, x[LANE], 1);")
    assert clang_errors(cuda_only, launch)


@pytest.mark.parametrize("name", QUANTIZED)
def test_clang_check_catches_a_broken_variant_of_the_kernel(name):
    kernel, launches = LAUNCHES[name]
    assert clang_errors(without_const_x(kernel), next(launches()))


# Metal passes an input of fewer than 8 elements in the constant address space (MLX's max_constant_array_size in
# mlx/backend/common/metal_kernel.cpp): a body that casts it to a device pointer does not compile there.


def test_router_metal_build_takes_few_experts_at_one_token():
    """A router with 7 or fewer experts at one token has its logits in constant memory."""
    for experts in (2, 4, 7):
        launch = router_kernel.launch(mx.zeros((1, experts), mx.bfloat16), 2, True)
        assert clang_errors(router_kernel.KERNEL, launch) == [], experts


def test_clang_check_catches_a_constant_input_cast_to_device():
    """A 4-word matrix (one row of 32 values at 4 bits) given to qmatmul's body: the check sees Metal's error."""
    _, w, scales, biases = quantized(1, 32, 32, 4)
    launch = qmatmul_kernel.launch(mx.zeros((1, 32)), w, scales, biases, 32, 4)
    assert any("with an lvalue of type 'constant " in e for e in clang_errors(qmatmul_kernel.KERNEL, launch))


def test_quantized_kernels_leave_tiny_matrices_to_mlx(monkeypatch):
    """qmatmul, gather_qmv and the fused projections cast their matrices to device pointers: a matrix whose weights,
    scales or biases have fewer than 8 elements goes to MLX's op; the smallest one taken builds for Metal."""
    calls = kernel_calls(monkeypatch, "metal")
    x = mx.zeros((1, 32))
    for n in (1, 7):  # scales and biases (n, 1): fewer than 8
        _, w, scales, biases = quantized(n, 32, 32, 4)
        kernels.qmatmul(x, w, scales, biases, 32, 4)
        layers = [QuantizedLinear.from_linear(nn.Linear(32, n, bias=False), 32, 4) for _ in range(3)]
        kernels.linears(x, *layers)
        kernels.swiglu(x, *layers[:2])
    for e, n in ((1, 4), (7, 1)):
        w, scales, biases = quantized_experts(e, n, 32, 32, 4)
        kernels.gather_qmm(mx.zeros((1, 1, 1, 1, 32)), w, scales, biases, mx.zeros((1, 1, 2), mx.int32), 32, 4,
                           False)
    assert calls == []
    _, w, scales, biases = quantized(8, 32, 32, 4)  # scales and biases (8, 1): the smallest taken
    kernels.qmatmul(x, w, scales, biases, 32, 4)
    w, scales, biases = quantized_experts(2, 4, 32, 32, 4)
    kernels.gather_qmm(mx.zeros((1, 1, 1, 1, 32)), w, scales, biases, mx.zeros((1, 1, 2), mx.int32), 32, 4, False)
    assert [kernel for kernel, _, _ in calls] == [qmatmul_kernel.KERNEL, gather_kernel.KERNEL]
    for kernel, _, launch in calls:
        assert clang_errors(kernel, launch) == [], kernel.name


def test_info_shows_the_kernels_backend(tiny_checkpoint, capsys, monkeypatch):
    from qwen_mlx.cli import main

    monkeypatch.delenv(kernels.ENV, raising=False)
    assert main(["info", "-m", str(tiny_checkpoint("qwen3"))]) in (0, None)
    assert "kernels      reference" in capsys.readouterr().out
