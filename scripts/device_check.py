"""One command on the lent NVIDIA GPU that proves the custom kernels (docs/kernels.md has the device command).

1. Correctness: custom qmatmul vs mx.quantized_matmul for bits x group size x dtype x M in {1, 2, 4, 8} on the
   Qwen3 0.6B / 4B / 30B-A3B (attention and expert) shapes and the 151,936 x 2,560 LM head, each also measured
   against the float32 product of the dequantized weights; custom gather-qmv vs mx.gather_qmm for bits 4/8 x group
   size x dtype x 1/2/4/8 decode tokens of 8 experts on the 30B-A3B and 235B-A22B expert stacks (random, one-expert
   and repeated-expert routing), likewise; custom RoPE (with and without QK-norm, default and YaRN frequencies,
   several offsets) vs the reference path (mx.fast.rms_norm + mx.fast.rope) and vs the plain float32 definition in
   qwen_mlx/rope.py; the gated-delta decode step at Qwen3.5-35B-A3B's shapes over several tokens vs its reference
   in MLX's ops; logits of 2-layer 4B- and 30B-A3B-shaped 4-bit models, custom vs reference kernels.
2. Micro-benchmarks at the decode shapes: many calls on different weight matrices per synchronisation, our kernels
   vs MLX's built-ins, GB/s and fraction of HBM bandwidth, against the targets of issues 6 and 12; the gated-delta
   step vs its reference ops (GB/s of the state read and written).
3. End to end: decode tok/s of a 4B-shaped and a few-layer 30B-A3B-shaped 4-bit model with custom kernels,
   reference kernels and mlx-lm.

Prints tables, writes JSON (--json), and exits 1 on any correctness mismatch (the speed targets only report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.nn as nn  # noqa: E402

from qwen_mlx.bench import run as bench
from qwen_mlx.kernels import ops as kernels  # noqa: E402
from qwen_mlx.models.config import ModelConfig  # noqa: E402
from qwen_mlx.models.rope import Rope, cos_sin, make_rope, rotate_reference  # noqa: E402
from qwen_mlx.weights.quant import QuantizedLinear, QuantizedSwitchLinear  # noqa: E402

qmatmul_kernel = sys.modules["qwen_mlx.kernels.qmatmul"]  # the module (kernels.qmatmul is the function)
gather_kernel = sys.modules["qwen_mlx.kernels.gather_qmv"]
gated_delta_kernel = sys.modules["qwen_mlx.kernels.gated_delta"]

SHAPES = {  # name -> (N, K) of x @ W.T, W (N, K)
    "0.6b q": (2048, 1024), "0.6b kv": (1024, 1024), "0.6b o": (1024, 2048), "0.6b gate/up": (3072, 1024),
    "0.6b down": (1024, 3072),
    "4b q": (4096, 2560), "4b kv": (1024, 2560), "4b o": (2560, 4096), "4b gate/up": (9728, 2560),
    "4b down": (2560, 9728),
    "30b q": (4096, 2048), "30b kv": (512, 2048), "30b o": (2048, 4096), "30b expert gate/up": (768, 2048),
    "30b expert down": (2048, 768),
    "lm head": (151936, 2560),
}
EXPERT_SHAPES = {  # name -> (E, N, K) of the stacked expert weights; gate/up is the model's joined stack
    "30b-a3b gate/up": (128, 2 * 768, 2048), "30b-a3b down": (128, 2048, 768),
    "235b-a22b gate/up": (128, 2 * 1536, 4096), "235b-a22b down": (128, 4096, 1536),
}
TOP_K = 8  # experts per token, both models
# The gated delta rule's decode step: name -> (B, key heads, value heads, Dk, Dv). Qwen3.5-35B-A3B's linear attention
# (linear_num_key_heads 16, linear_num_value_heads 32, key and value head dims 128; Qwen3-Next-80B-A3B's are the same).
GATED_DELTA_SHAPES = {"35b-a3b": (1, 16, 32, 128, 128), "35b-a3b batch 4": (4, 16, 32, 128, 128),
                      "odd (3 value heads per key head, 24 x 40)": (2, 1, 3, 24, 40)}
GATED_DELTA_BENCH_SHAPES = {"35b-a3b": (1, 16, 32, 128, 128), "35b-a3b batch 8": (8, 16, 32, 128, 128)}
GATED_DELTA_STEPS = 6
GATED_DELTA_STATE_TOLERANCE = 1e-4  # the float32 state, max |ours - reference| / max |reference|, any input dtype
# The fused projections: model -> (q rows, k/v rows, intermediate, hidden); 30B-A3B's dense layers are its attention.
FUSED_MODELS = {"0.6b": (2048, 1024, 3072, 1024), "4b": (4096, 1024, 9728, 2560), "30b-a3b": (4096, 512, None, 2048)}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# max |ours - reference| / max |reference|: the output's rounding at that width, plus room for a different order
# of float32 sums.
TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3, "float32": 1e-4}
TARGET_SPEEDUP = {4: 2.0, 8: 1.0}  # issue 6, must-show 2
GATHER_TARGET_SPEEDUP, GATHER_TARGET_US = 5.0, 9.7  # issue 12: 8 experts of 768 x 2048, 4-bit, one token
GATHER_TARGET_SHAPE = "30b-a3b gate (768x2048)"
GATHER_BENCH_SHAPES = {GATHER_TARGET_SHAPE: (128, 768, 2048), **EXPERT_SHAPES}
GATHER_BENCH_CASES = [(name, 1) for name in GATHER_BENCH_SHAPES] + [("30b-a3b gate/up", 4), ("30b-a3b down", 4)]
# --quick's qmatmul checks beyond its grid: (bits, groups, dtypes, M) products.
QUICK_QMATMUL_EXTRA = [((2, 3, 5, 6), (64,), ("bfloat16",), (1,)), ((4,), (32, 128), ("float16",), (1,))]
# Shapes timed at every M the kernel is built for, at 4 and 8 bits: where our qmatmul stops beating
# mx.quantized_matmul (on sm_90 MLX takes M >= 2 to a tensor-core qmm), the dispatch limit qmatmul.DISPATCH_MAX_M.
CROSSOVER_SHAPES = ("0.6b q", "4b q", "4b gate/up", "4b down")


@contextmanager
def kernels_choice(choice: str):
    """QWEN_MLX_KERNELS=choice inside the block. With "custom" the dense kernels also take every M they are built for
    (qmatmul.MAX_M), not only up to their dispatch limit (qmatmul.DISPATCH_MAX_M), so that the checks cover those
    sizes and the crossover is timed."""
    before, limits = os.environ.get(kernels.ENV), dict(qmatmul_kernel.DISPATCH_MAX_M)
    os.environ[kernels.ENV] = choice
    if choice == "custom":
        qmatmul_kernel.DISPATCH_MAX_M.update(dict.fromkeys(limits, qmatmul_kernel.MAX_M))
    try:
        yield
    finally:
        qmatmul_kernel.DISPATCH_MAX_M.update(limits)
        if before is None:
            os.environ.pop(kernels.ENV)
        else:
            os.environ[kernels.ENV] = before


def relative_errors(got: mx.array, expected: mx.array) -> mx.array:
    """max |got - expected| / max |expected|, as a lazy scalar."""
    expected = expected.astype(mx.float32)
    return mx.abs(got.astype(mx.float32) - expected).max() / mx.maximum(mx.abs(expected).max(), 1e-30)


def relative_error(got: mx.array, expected: mx.array) -> float:
    return relative_errors(got, expected).item()


# 1. Correctness


def judged(ours: mx.array, theirs: mx.array, truth: mx.array, dtype_name: str) -> dict:
    """The criterion for one output, with e(a, b) = max |a - b| / max |b|: ours is as close to the float32 truth
    as the tolerance (or as MLX's own result is) and, by the triangle inequality, no further from MLX's result than
    the tolerance plus MLX's own error."""
    errors = mx.stack([relative_errors(ours, theirs), relative_errors(ours, truth),
                       relative_errors(theirs, truth)]).tolist()
    tolerance, own = TOLERANCE[dtype_name], errors[2]
    return dict(vs_mlx=errors[0], ours_vs_fp32=errors[1], mlx_vs_fp32=own, tolerance=tolerance,
                ok=errors[1] <= max(tolerance, own) and errors[0] <= tolerance + own)


def quantized_variants(base: mx.array, dtypes, bits_list, groups):
    """(dtype name, bits, group, (w, scales, biases)): `base` cast to each dtype and quantized each way, the cache
    cleared after each dtype."""
    for dtype_name in dtypes:
        w_full = base.astype(DTYPES[dtype_name])
        for bits in bits_list:
            for group in groups:
                yield dtype_name, bits, group, mx.quantize(w_full, group, bits)
        del w_full
        mx.clear_cache()


def check_qmatmul(bits_list, groups, dtypes, ms, shapes, log) -> list[dict]:
    rows = []
    for name, (n, k) in shapes.items():
        base = mx.random.normal((n, k), key=mx.random.key(n + k)) * 0.02
        for dtype_name, bits, group, (w, scales, biases) in quantized_variants(base, dtypes, bits_list, groups):
            dense = mx.dequantize(w, scales, biases, group, bits).astype(mx.float32)
            for m in ms:
                x = mx.random.normal((m, k), key=mx.random.key(m)).astype(DTYPES[dtype_name])
                if not qmatmul_kernel.supports(x, w, biases, group, bits, "affine"):
                    raise SystemExit(f"the kernel does not cover {name} bits {bits} group {group} M {m}")
                with kernels_choice("custom"):
                    ours = kernels.qmatmul(x, w, scales, biases, group, bits)
                theirs = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group, bits=bits)
                row = dict(shape=name, n=n, k=k, bits=bits, group=group, dtype=dtype_name, m=m,
                           **judged(ours, theirs, x.astype(mx.float32) @ dense.T, dtype_name))
                rows.append(row)
                if not row["ok"]:
                    log(f"MISMATCH qmatmul {row}")
        log(f"qmatmul {name:<18} ({n}x{k}): {sum(r['ok'] for r in rows if r['shape'] == name)}/"
            f"{sum(r['shape'] == name for r in rows)} within tolerance, worst vs MLX "
            f"{max(r['vs_mlx'] for r in rows if r['shape'] == name):.2e}")
    return rows


def routings(tokens: int, experts: int, seed: int) -> dict[str, mx.array]:
    """(tokens, TOP_K) expert indices: distinct random experts per token, every pair on the last expert, and each
    token's experts two repeated ones."""
    random = mx.stack([mx.random.permutation(experts, key=mx.random.key(seed + t))[:TOP_K] for t in range(tokens)])
    repeated = mx.array([[t % experts] * (TOP_K // 2) + [(t + 1) % experts] * (TOP_K // 2) for t in range(tokens)])
    return {"random": random.astype(mx.int32), "one expert": mx.full((tokens, TOP_K), experts - 1, mx.int32),
            "repeated": repeated.astype(mx.int32)}


def gather_inputs(name: str, tokens: int, k: int, dtype: mx.Dtype) -> mx.array:
    """x as the model passes it: (tokens, 1, 1, K) for gate/up (each token's row serves its experts),
    (tokens, TOP_K, 1, K) for down (a row per (token, expert))."""
    rows = 1 if "gate/up" in name else TOP_K
    return mx.random.normal((tokens, rows, 1, k), key=mx.random.key(tokens)).astype(dtype)


def check_gather_qmv(bits_list, groups, dtypes, token_counts, shapes, log) -> list[dict]:
    rows = []
    for name, (e, n, k) in shapes.items():
        base = mx.random.normal((e, n, k), key=mx.random.key(n + k)) * 0.02
        for dtype_name, bits, group, (w, scales, biases) in quantized_variants(base, dtypes, bits_list, groups):
            for tokens in token_counts:
                x = gather_inputs(name, tokens, k, DTYPES[dtype_name])
                for routing, experts in routings(tokens, e, tokens).items():
                    row = gather_case(x, w, scales, biases, experts, group, bits, dtype_name)
                    row.update(shape=name, e=e, n=n, k=k, bits=bits, group=group, dtype=dtype_name, tokens=tokens,
                               routing=routing)
                    rows.append(row)
                    if not row["ok"]:
                        log(f"MISMATCH gather_qmv {row}")
        del base
        log(f"gather_qmv {name:<18} ({e}x{n}x{k}): {sum(r['ok'] for r in rows if r['shape'] == name)}/"
            f"{sum(r['shape'] == name for r in rows)} within tolerance, worst vs MLX "
            f"{max(r['vs_mlx'] for r in rows if r['shape'] == name):.2e}")
    return rows


def gather_case(x, w, scales, biases, experts, group: int, bits: int, dtype_name: str) -> dict:
    """Ours vs mx.gather_qmm and both vs the float32 product with the selected experts' dequantized weights."""
    if not gather_kernel.supports(x, w, biases, experts, group, bits, "affine"):
        raise SystemExit(f"the gather kernel does not cover x {x.shape} w {w.shape} bits {bits} group {group}")
    with kernels_choice("custom"):
        ours = kernels.gather_qmm(x, w, scales, biases, experts, group, bits, False)
    theirs = mx.gather_qmm(x, w, scales, biases, rhs_indices=experts, transpose=True, group_size=group, bits=bits)
    flat = experts.reshape(-1)
    dense = mx.dequantize(w[flat], scales[flat], biases[flat], group, bits).astype(mx.float32)  # (P, N, K)
    pairs = mx.broadcast_to(x, (*experts.shape, 1, x.shape[-1])).reshape(flat.size, 1, -1).astype(mx.float32)
    truth = (pairs @ dense.swapaxes(-1, -2)).reshape(ours.shape)
    return judged(ours, theirs, truth, dtype_name)


def quantized_layer(n: int, k: int, group: int, bits: int, dtype: mx.Dtype, seed: int) -> tuple[QuantizedLinear,
                                                                                                 mx.array]:
    """A random (n, k) layer as the model holds it, and its dequantized float32 weight."""
    w = (mx.random.normal((n, k), key=mx.random.key(seed)) * 0.02).astype(dtype)
    q = mx.quantize(w, group, bits)
    layer = QuantizedLinear(k, n, bias=False, group_size=group, bits=bits)
    layer.weight, layer.scales, layer.biases = q
    return layer, mx.dequantize(*q, group, bits).astype(mx.float32)


def check_fused(bits_list, groups, dtypes, ms, models: dict, expert_shapes: dict, log) -> list[dict]:
    """kernels.linears (Q, K, V in one launch, and its two-part form), kernels.swiglu (gate, up, SwiGLU), and the
    experts' decode pair kernels.expert_swiglu / kernels.expert_sum, custom vs MLX's ops and vs float32, on the
    models' shapes."""
    rows = []
    for model, (nq, nkv, inter, hidden) in models.items():
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for bits in bits_list:
                for group in groups:
                    qkv = [quantized_layer(n, hidden, group, bits, dtype, seed=i) for i, n in enumerate((nq, nkv, nkv))]
                    mlp = [quantized_layer(inter, hidden, group, bits, dtype, seed=3 + i) for i in range(2)] \
                        if inter else []
                    for m in ms:
                        x = mx.random.normal((m, hidden), key=mx.random.key(m)).astype(dtype)
                        with kernels_choice("custom"):
                            outs = kernels.linears(x, *(layer for layer, _ in qkv))
                            pair = kernels.linears(x, qkv[0][0], qkv[1][0])  # the two-part form
                            act = kernels.swiglu(x, *(layer for layer, _ in mlp)) if mlp else None
                        with kernels_choice("reference"):  # MLX's ops: on a GPU the layers would call ours
                            theirs = [layer(x) for layer, _ in qkv]
                            act_mlx = nn.silu(mlp[0][0](x)) * mlp[1][0](x) if mlp else None
                        case = dict(model=model, bits=bits, group=group, dtype=dtype_name, m=m)
                        for op, ours, mlx_out, (_, dense) in zip(
                                ["linears q", "linears k", "linears v", "linears pair q", "linears pair k"],
                                outs + pair, theirs + theirs[:2], qkv + qkv[:2]):
                            rows.append(dict(case, op=op, **judged(ours, mlx_out, x.astype(mx.float32) @ dense.T,
                                                                   dtype_name)))
                        if mlp:
                            (_, g32), (_, u32) = mlp
                            x32 = x.astype(mx.float32)
                            rows.append(dict(case, op="swiglu", **judged(
                                act, act_mlx, nn.silu(x32 @ g32.T) * (x32 @ u32.T), dtype_name)))
                    del qkv, mlp
                    mx.clear_cache()
    for name, (e, n, k) in expert_shapes.items():  # (E, 2 * intermediate, hidden): the joined gate/up stack
        for dtype_name in dtypes:
            for bits in bits_list:
                for group in groups:
                    gate_up, down = expert_layers(e, n, k, group, bits, DTYPES[dtype_name], seed=0)
                    for tokens in ms:
                        x = mx.random.normal((tokens, 1, 1, k), key=mx.random.key(tokens)).astype(DTYPES[dtype_name])
                        for routing, experts in routings(tokens, e, tokens).items():
                            weights = mx.softmax(mx.random.normal(experts.shape, key=mx.random.key(7)), axis=-1)
                            rows += expert_cases(x, gate_up, down, experts, weights, group, bits, dict(
                                model=name, bits=bits, group=group, dtype=dtype_name, m=tokens, routing=routing))
                    del gate_up, down
                    mx.clear_cache()
    for row in rows:
        if not row["ok"]:
            log(f"MISMATCH fused {row}")
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        log(f"fused {op:<18} {sum(r['ok'] for r in mine)}/{len(mine)} within tolerance, worst vs MLX "
            f"{max(r['vs_mlx'] for r in mine):.2e}")
    return rows


def check_router(dtypes, token_counts, log) -> list[dict]:
    """kernels.route (softmax, top-8 of 128 experts, renormalized or not) custom vs its definition in MLX's ops
    (float32 softmax, a full sort): the same experts per token and weights within 1e-5."""
    rows = []
    for dtype_name in dtypes:
        for tokens in token_counts:
            logits = (mx.random.normal((tokens, 128), key=mx.random.key(tokens)) * 3).astype(DTYPES[dtype_name])
            for norm in (True, False):
                with kernels_choice("custom"):
                    experts, weights = kernels.route(logits, TOP_K, norm)
                probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # the definition, in MLX's ops
                ref_experts = mx.argsort(-probs, axis=-1)[..., :TOP_K].astype(mx.uint32)
                ref_weights = mx.take_along_axis(probs, ref_experts, axis=-1)
                ref_weights = ref_weights / ref_weights.sum(axis=-1, keepdims=True) if norm else ref_weights
                order, ref_order = mx.argsort(experts, axis=-1), mx.argsort(ref_experts, axis=-1)
                same = mx.array_equal(mx.take_along_axis(experts, order, -1),
                                      mx.take_along_axis(ref_experts, ref_order, -1)).item()
                error = relative_error(mx.take_along_axis(weights, order, -1),
                                       mx.take_along_axis(ref_weights, ref_order, -1))
                rows.append(dict(dtype=dtype_name, tokens=tokens, norm=norm, same_experts=same, vs_reference=error,
                                 tolerance=1e-5, ok=same and error <= 1e-5))
                if not rows[-1]["ok"]:
                    log(f"MISMATCH router {rows[-1]}")
    log(f"router: {sum(r['ok'] for r in rows)}/{len(rows)} equal to the reference (same experts, weights within "
        f"1e-5), worst {max(r['vs_reference'] for r in rows):.2e}")
    return rows


def gated_delta_inputs(shape: tuple, dtype: mx.Dtype, seed: int) -> tuple[mx.array, ...]:
    """One decode token as the model hands it to kernels.gated_delta_step: q, k (B, Hk, Dk) L2-normalised (q also
    scaled by Dk**-0.5) and v (B, Hv, Dv) in `dtype`, g (B, Hv) float32 = -exp(A_log) * softplus(a + dt_bias),
    beta (B, Hv) = sigmoid(b) in `dtype`."""
    b, hk, hv, dk, dv = shape
    key = mx.random.split(mx.random.key(seed), 6)
    q, k = (mx.random.normal((b, hk, dk), key=key[i]) for i in range(2))
    q, k = (a * mx.rsqrt((a * a).sum(axis=-1, keepdims=True) + 1e-6) for a in (q, k))
    v = mx.random.normal((b, hv, dv), key=key[2])
    g = -mx.exp(mx.random.uniform(-1, 1, (hv,), key=key[3])) * nn.softplus(mx.random.normal((b, hv), key=key[4]))
    beta = mx.sigmoid(mx.random.normal((b, hv), key=key[5]))
    return (q * dk ** -0.5).astype(dtype), k.astype(dtype), v.astype(dtype), g, beta.astype(dtype)


def gated_delta_state(shape: tuple, seed: int) -> mx.array:
    b, _, hv, dk, dv = shape
    return mx.random.normal((b, hv, dk, dv), key=mx.random.key(seed)) * 0.1


def check_gated_delta(dtypes, shapes: dict, steps: int, log) -> list[dict]:
    """kernels.gated_delta_step custom vs the reference in MLX's ops (gated_delta.reference, float32 inside) over
    `steps` decode tokens, each side carrying its own state: y within the dtype's tolerance, the float32 state
    within GATED_DELTA_STATE_TOLERANCE, as max |error| / max |reference| over the steps."""
    rows = []
    for name, shape in shapes.items():
        for dtype_name in dtypes:
            ours = theirs = gated_delta_state(shape, seed=len(name))
            worst_y = worst_state = 0.0
            for t in range(steps):
                args = gated_delta_inputs(shape, DTYPES[dtype_name], seed=t)
                if not gated_delta_kernel.supports(*args, ours):
                    raise SystemExit(f"the gated-delta kernel does not cover {name} {dtype_name}")
                with kernels_choice("custom"):
                    y, ours = kernels.gated_delta_step(*args, ours)
                y_ref, theirs = gated_delta_kernel.reference(*args, theirs)
                errors = mx.stack([relative_errors(y, y_ref), relative_errors(ours, theirs)]).tolist()
                worst_y, worst_state = max(worst_y, errors[0]), max(worst_state, errors[1])
            b, hk, hv, dk, dv = shape
            rows.append(dict(shape=name, b=b, hk=hk, hv=hv, dk=dk, dv=dv, dtype=dtype_name, steps=steps,
                             y_vs_reference=worst_y, state_vs_reference=worst_state,
                             y_tolerance=TOLERANCE[dtype_name], state_tolerance=GATED_DELTA_STATE_TOLERANCE,
                             ok=worst_y <= TOLERANCE[dtype_name] and worst_state <= GATED_DELTA_STATE_TOLERANCE))
            if not rows[-1]["ok"]:
                log(f"MISMATCH gated_delta {rows[-1]}")
    log(f"gated_delta: {sum(r['ok'] for r in rows)}/{len(rows)} within tolerance over {steps} steps, worst y "
        f"{max(r['y_vs_reference'] for r in rows):.2e}, worst state {max(r['state_vs_reference'] for r in rows):.2e}")
    return rows


def expert_layers(e: int, n: int, k: int, group: int, bits: int, dtype: mx.Dtype, seed: int):
    """A random joined gate/up stack (E, n, k) and its down stack (E, k, n / 2), as the model holds them."""
    def stack(shape, key):
        w = (mx.random.normal(shape, key=mx.random.key(key)) * 0.02).astype(dtype)
        return QuantizedSwitchLinear(*mx.quantize(w, group, bits), group, bits, "affine")
    return stack((e, n, k), seed), stack((e, k, n // 2), seed + 1)


def expert_cases(x, gate_up, down, experts, weights, group: int, bits: int, case: dict) -> list[dict]:
    """One decode step of the experts: SwiGLU of the joined gate/up stack, then down weighted and summed."""
    with kernels_choice("custom"):
        h = kernels.expert_swiglu(x, gate_up, experts, False)  # (T, k, 1, I)
        y = kernels.expert_sum(h, down, experts, weights)  # (T, H)
    with kernels_choice("reference"):  # MLX's ops: on a GPU the layers would call ours
        g, u = mx.split(gate_up(x, experts), 2, axis=-1)
        h_mlx = nn.silu(g) * u
        y_mlx = (down(h, experts).squeeze(-2) * weights[..., None].astype(h.dtype)).sum(axis=-2)
    flat = experts.reshape(-1)
    dense = lambda layer: mx.dequantize(layer.weight[flat], layer.scales[flat], layer.biases[flat], group,
                                        bits).astype(mx.float32)  # (P, N, K)
    pairs = mx.broadcast_to(x, (*experts.shape, 1, x.shape[-1])).reshape(flat.size, 1, -1).astype(mx.float32)
    g32, u32 = mx.split(pairs @ dense(gate_up).swapaxes(-1, -2), 2, axis=-1)
    h32 = (nn.silu(g32) * u32).reshape(h.shape)
    y32 = ((h.reshape(flat.size, 1, -1).astype(mx.float32) @ dense(down).swapaxes(-1, -2)).reshape(
        *experts.shape, -1) * weights[..., None]).sum(axis=-2)  # from our h, so that only the sum is judged
    dtype_name = case["dtype"]
    return [dict(case, op="expert_swiglu", **judged(h, h_mlx, h32, dtype_name)),
            dict(case, op="expert_sum", **judged(y, y_mlx, y32, dtype_name))]


def norm_reference(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    x = x.astype(mx.float32)
    return x * mx.rsqrt((x * x).mean(-1, keepdims=True) + eps) * weight.astype(mx.float32)


def check_rope(dtypes, log) -> list[dict]:
    rows = []
    heads = {"0.6b": (16, 8), "4b": (32, 8), "30b": (32, 4)}
    frequencies = {"default": bench.preset_config("qwen3-4b", 1),
                   "yarn": ModelConfig.from_dict({**bench.PRESETS["qwen3-4b"], "rope_scaling": {
                       "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, "yarn")}
    for freq_name, cfg in frequencies.items():
        rope = make_rope(cfg)
        for model, (hq, hk) in heads.items():
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                for length in (1, 7, 300):
                    q = mx.random.normal((1, length, hq, 128), key=mx.random.key(length)).astype(dtype)
                    k = mx.random.normal((1, length, hk, 128), key=mx.random.key(length + 1)).astype(dtype)
                    weights = (mx.random.uniform(0.5, 1.5, (128,)).astype(dtype),
                               mx.random.uniform(0.5, 1.5, (128,)).astype(dtype), 1e-6)
                    for norms in (None, weights):
                        for offset in (0, 5, 4096, 40000):
                            rows.append(rope_case(rope, q, k, offset, norms, dtype_name, model, freq_name))
                            if not rows[-1]["ok"]:
                                log(f"MISMATCH rope {rows[-1]}")
    log(f"rope: {sum(r['ok'] for r in rows)}/{len(rows)} within tolerance, worst vs reference path "
        f"{max(r['vs_reference'] for r in rows):.2e}, vs float32 definition {max(r['vs_fp32'] for r in rows):.2e}")
    return rows


def rope_case(rope: Rope, q, k, offset: int, norms, dtype_name: str, model: str, freq_name: str) -> dict:
    with kernels_choice("custom"):
        ours = kernels.rope(q, k, rope.inv_freq, rope.wavelengths, offset=offset, norms=norms,
                            scale=rope.attention_factor)
    with kernels_choice("reference"):
        reference = kernels.rope(q, k, rope.inv_freq, rope.wavelengths, offset=offset, norms=norms,
                                 scale=rope.attention_factor)
    length = q.shape[1]
    cos, sin = cos_sin(rope, offset, length)
    cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    vs_reference = vs_fp32 = 0.0
    for got, ref, x, weight in ((ours[0], reference[0], q, norms and norms[0]),
                                (ours[1], reference[1], k, norms and norms[1])):
        x = norm_reference(x, weight, norms[2]) if norms else x.astype(mx.float32)
        definition = rotate_reference(x.transpose(0, 2, 1, 3), cos, sin)
        vs_reference = max(vs_reference, relative_error(got, ref))
        vs_fp32 = max(vs_fp32, relative_error(got, definition))
    # An angle position * inv_freq carries float32 rounding that grows with the position (both sides have it).
    tolerance = TOLERANCE[dtype_name] + 4e-7 * (offset + length)
    return dict(model=model, frequencies=freq_name, dtype=dtype_name, length=length, offset=offset,
                norm=norms is not None, vs_reference=vs_reference, vs_fp32=vs_fp32, tolerance=tolerance,
                ok=vs_reference <= tolerance and vs_fp32 <= tolerance)


def check_model(preset: str, log) -> dict:
    """Logits of a 2-layer `preset`-shaped 4-bit model over a prompt and 4 cached decode steps: custom vs
    reference. (30B-A3B: the prompt's 8 x 8 (token, expert) pairs and each step's 8 run the gather kernel.)"""
    from qwen_mlx.cache.kv import make_cache

    cfg = bench.preset_config(preset, 2)
    mx.random.seed(0)
    model = bench.random_model(cfg, "4")
    tokens = mx.random.randint(0, cfg.vocab_size, (1, 12), key=mx.random.key(5))
    outputs = {}
    for choice in ("custom", "reference"):
        with kernels_choice(choice):
            cache = make_cache(cfg)
            logits = [model(tokens[:, :8], cache)[:, -1]]
            for i in range(8, 12):
                logits.append(model(tokens[:, i:i + 1], cache)[:, -1])
            outputs[choice] = mx.concatenate(logits).astype(mx.float32)
            mx.eval(outputs[choice])
    error = relative_error(outputs["custom"], outputs["reference"])
    result = dict(preset=preset, vs_reference=error, tolerance=5e-2, ok=error <= 5e-2)
    log(f"{preset} logits (2 layers, 4-bit, prompt 8 + 4 decode steps): custom vs reference {error:.2e}")
    return result


# 2. Micro-benchmarks


def hbm_gbs(flag: float | None) -> tuple[str, float]:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        name = "unknown GPU"
    if flag:
        return name, flag
    known = {"H100": 3350.0, "H200": 4800.0}
    return name, next((gbs for key, gbs in known.items() if key in name), 3350.0)


def time_per_call(fn, operands: list[tuple], x: mx.array, calls: int = 240, rounds: int = 5) -> float:
    """Seconds per call: `calls` calls cycling through different weight matrices, one evaluation for all."""
    best = math.inf
    for _ in range(rounds + 1):  # the first round compiles and warms up
        outs = [fn(x, *operands[i % len(operands)]) for i in range(calls)]
        start = time.perf_counter()
        mx.eval(outs)
        best = min(best, time.perf_counter() - start)
    return best / calls


def bench_qmatmul(shapes, peak: float, log) -> list[dict]:
    """4 and 8 bits, group 64, bf16: every shape at M = 1, the CROSSOVER_SHAPES at every M up to qmatmul.MAX_M;
    calls cycling through copies of the matrix (far more bytes than the 50 MB L2 holds), ours vs MLX's."""
    rows = []
    for bits in (4, 8):
        for name, (n, k) in shapes.items():
            one = mx.random.normal((n, k), key=mx.random.key(1)).astype(mx.bfloat16) * 0.02
            sample = mx.quantize(one, 64, bits)
            nbytes = sum(a.nbytes for a in sample)
            copies = max(2, min(256, math.ceil(1.5e9 / nbytes)))
            operands = [sample] + [mx.quantize(one + i * 1e-3, 64, bits) for i in range(1, copies)]
            mx.eval(operands)
            del one

            def ours(x, w, s, b):
                with kernels_choice("custom"):
                    return kernels.qmatmul(x, w, s, b, 64, bits)

            def builtin(x, w, s, b):
                return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=bits)

            for m in range(1, qmatmul_kernel.MAX_M + 1) if name in CROSSOVER_SHAPES else (1,):
                x = mx.random.normal((m, k), key=mx.random.key(2)).astype(mx.bfloat16)
                moved = nbytes + x.nbytes + m * n * 2
                t_ours, t_mlx = time_per_call(ours, operands, x), time_per_call(builtin, operands, x)
                row = dict(shape=name, n=n, k=k, bits=bits, m=m, ours_us=t_ours * 1e6, mlx_us=t_mlx * 1e6,
                           speedup=t_mlx / t_ours, ours_gbs=moved / t_ours / 1e9, mlx_gbs=moved / t_mlx / 1e9,
                           ours_hbm_fraction=moved / t_ours / 1e9 / peak, limit_us=moved / (peak * 1e9) * 1e6,
                           target_speedup=TARGET_SPEEDUP[bits] if m == 1 else None)
                row["target_met"] = row["target_speedup"] is None or row["speedup"] >= row["target_speedup"]
                rows.append(row)
                log(f"{name:<18} {bits}-bit M={m}  ours {row['ours_us']:8.1f} us {row['ours_gbs']:7.0f} GB/s "
                    f"({100 * row['ours_hbm_fraction']:4.1f}% HBM)  MLX {row['mlx_us']:8.1f} us "
                    f"{row['mlx_gbs']:7.0f} GB/s  x{row['speedup']:.2f}"
                    + ("" if row["target_met"] else f"  TARGET x{row['target_speedup']} MISSED"))
            del operands
            mx.clear_cache()
    return rows


def crossover(rows: list[dict], backend: str) -> dict:
    """From bench_qmatmul's rows: the largest M such that at every M up to it our qmatmul is at least as fast as
    mx.quantized_matmul on every CROSSOVER_SHAPES shape at both widths (0: not even at M = 1). That is the value of
    qmatmul.DISPATCH_MAX_M[backend] for this GPU."""
    slowest = {}
    for row in rows:
        if row["shape"] in CROSSOVER_SHAPES:
            slowest[row["m"]] = min(slowest.get(row["m"], math.inf), row["speedup"])
    max_m = 0
    for m in range(1, qmatmul_kernel.MAX_M + 1):
        if slowest.get(m, 0.0) < 1.0:
            break
        max_m = m
    return dict(backend=backend, max_m=max_m, slowest_speedup_by_m=slowest, shapes=list(CROSSOVER_SHAPES),
                dispatch_max_m_now=qmatmul_kernel.DISPATCH_MAX_M.get(backend))  # None off a GPU


def bench_gather_qmv(shapes: dict, cases: list[tuple[str, int]], peak: float, log) -> list[dict]:
    """4-bit decode, TOP_K experts per token, for each (shape name, tokens): calls cycling through several copies of
    the expert stack (more bytes than the L2 holds) and a different random routing each, ours vs mx.gather_qmm."""
    rows = []
    for name, tokens in cases:
        e, n, k = shapes[name]
        one = mx.random.normal((e, n, k), key=mx.random.key(1)).astype(mx.bfloat16) * 0.02
        sample = mx.quantize(one, 64, 4)
        stack_bytes = sum(a.nbytes for a in sample)
        copies = max(2, min(8, math.ceil(1.5e9 / stack_bytes)))
        stacks = [sample] + [mx.quantize(one + i * 1e-3, 64, 4) for i in range(1, copies)]
        del one
        routes = [routings(tokens, e, 1000 + i)["random"] for i in range(32)]
        operands = [(*stacks[i % copies], routes[i]) for i in range(32)]
        mx.eval(stacks, routes)
        x = gather_inputs(name, tokens, k, mx.bfloat16)

        def ours(x, w, s, b, experts):
            with kernels_choice("custom"):
                return kernels.gather_qmm(x, w, s, b, experts, 64, 4, False)

        def builtin(x, w, s, b, experts):
            return mx.gather_qmm(x, w, s, b, rhs_indices=experts, transpose=True, group_size=64, bits=4)

        unique = sum(len(set(r.reshape(-1).tolist())) for r in routes) / len(routes)  # experts read per call
        moved = stack_bytes / e * unique + x.nbytes + tokens * TOP_K * n * 2
        t_ours, t_mlx = time_per_call(ours, operands, x), time_per_call(builtin, operands, x)
        target = name == GATHER_TARGET_SHAPE and tokens == 1
        row = dict(shape=name, e=e, n=n, k=k, bits=4, tokens=tokens, experts_per_token=TOP_K, ours_us=t_ours * 1e6,
                   mlx_us=t_mlx * 1e6, speedup=t_mlx / t_ours, ours_gbs=moved / t_ours / 1e9,
                   mlx_gbs=moved / t_mlx / 1e9, ours_hbm_fraction=moved / t_ours / 1e9 / peak,
                   limit_us=moved / (peak * 1e9) * 1e6, target_speedup=GATHER_TARGET_SPEEDUP if target else None,
                   target_us=GATHER_TARGET_US if target else None)
        row["target_met"] = not target or (row["speedup"] >= GATHER_TARGET_SPEEDUP
                                           and row["ours_us"] <= GATHER_TARGET_US)
        rows.append(row)
        log(f"gather {name:<24} T={tokens} x{TOP_K}  ours {row['ours_us']:7.1f} us {row['ours_gbs']:6.0f} GB/s "
            f"({100 * row['ours_hbm_fraction']:4.1f}% HBM)  MLX {row['mlx_us']:7.1f} us {row['mlx_gbs']:6.0f} GB/s  "
            f"x{row['speedup']:.2f}" + ("" if row["target_met"] else
                                        f"  TARGET x{GATHER_TARGET_SPEEDUP} and {GATHER_TARGET_US} us MISSED"))
        del stacks, operands
        mx.clear_cache()
    return rows


def bench_fused(log, dense: tuple = FUSED_MODELS["4b"], experts: tuple = EXPERT_SHAPES["30b-a3b gate/up"],
                copies: int = 24) -> list[dict]:
    """One decode token, bf16, 4-bit, group 64: the launches the fused ops replace, timed both ways over `copies`
    copies of the weights (more bytes than the L2 holds). 4B's Q/K/V and gate/up/SwiGLU; 30B-A3B's experts (SwiGLU
    of 8 experts' gate/up, then down weighted and summed) against mx.gather_qmm and MLX's elementwise ops."""
    rows = []
    nq, nkv, inter, hidden = dense

    def layers(n, k, copies, seed):
        return [quantized_layer(n, k, 64, 4, mx.bfloat16, seed=seed + 10 * i)[0] for i in range(copies)]

    x = mx.random.normal((1, hidden)).astype(mx.bfloat16)
    qkv = list(zip(*(layers(n, hidden, copies, seed) for seed, n in enumerate((nq, nkv, nkv)))))
    mlp = list(zip(layers(inter, hidden, copies // 2, 3), layers(inter, hidden, copies // 2, 4)))
    mx.eval(qkv, mlp)

    def fused_qkv(x, q, k, v):
        with kernels_choice("custom"):
            return kernels.linears(x, q, k, v)

    def our_three(x, q, k, v):
        with kernels_choice("custom"):
            return [layer(x) for layer in (q, k, v)]

    def fused_mlp(x, gate, up):
        with kernels_choice("custom"):
            return kernels.swiglu(x, gate, up)

    def our_mlp(x, gate, up):
        with kernels_choice("custom"):
            return nn.silu(gate(x)) * up(x)

    def mlx_mlp(x, gate, up):
        with kernels_choice("reference"):
            return nn.silu(gate(x)) * up(x)

    def mlx_three(x, q, k, v):
        with kernels_choice("reference"):
            return [layer(x) for layer in (q, k, v)]

    cases = [("4b q/k/v, one launch", fused_qkv, [("3 x our qmatmul", our_three),
                                                 ("3 x mx.quantized_matmul", mlx_three)], qkv),
             ("4b gate/up + SwiGLU, one launch", fused_mlp, [("our qmatmul x 2 + silu * up", our_mlp),
                                                            ("MLX: quantized_matmul x 2 + silu * up", mlx_mlp)], mlp)]
    e, n, k = experts
    stacks = [(*expert_layers(e, n, k, 64, 4, mx.bfloat16, seed=20 + 2 * i), routings(1, e, 60 + i)["random"][None],
               mx.softmax(mx.random.normal((1, 1, TOP_K), key=mx.random.key(i)), axis=-1))
              for i in range(max(2, copies // 4))]
    mx.eval([(gate_up.parameters(), down.parameters(), r, w) for gate_up, down, r, w in stacks])
    x_moe = mx.random.normal((1, 1, 1, 1, k)).astype(mx.bfloat16)

    def experts_fused(x, gate_up, down, experts, weights):
        with kernels_choice("custom"):
            return kernels.expert_sum(kernels.expert_swiglu(x, gate_up, experts, False), down, experts, weights)

    def experts_with(choice):
        def run(x, gate_up, down, experts, weights):
            with kernels_choice(choice):
                g, u = mx.split(gate_up(x, experts), 2, axis=-1)
                y = down(nn.silu(g) * u, experts).squeeze(-2)
                return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        return run

    cases.append(("30b-a3b experts, 2 launches", experts_fused, [
        ("our gather_qmv x 2 + ops", experts_with("custom")), ("MLX: gather_qmm x 2 + ops", experts_with("reference"))],
        stacks))

    def router(choice):
        def run(_, logits):
            with kernels_choice(choice):
                return kernels.route(logits, TOP_K, True)
        return run

    logits = [(mx.random.normal((1, 1, e), key=mx.random.key(i)).astype(mx.bfloat16),) for i in range(8)]
    cases.append(("30b-a3b router, one launch", router("custom"), [("MLX: softmax + top-k ops", router("reference"))],
                  logits))
    for name, fused, others, operands in cases:
        inputs = x_moe if "experts" in name else x
        t_fused = time_per_call(fused, operands, inputs)
        row = dict(case=name, fused_us=t_fused * 1e6)
        line = f"{name:<34} {t_fused * 1e6:7.1f} us"
        for other_name, other in others:
            t = time_per_call(other, operands, inputs)
            row[other_name] = t * 1e6
            line += f" | {other_name} {t * 1e6:7.1f} us (x{t / t_fused:.2f})"
        rows.append(row)
        log(line)
    del qkv, mlp, stacks
    mx.clear_cache()
    return rows


def bench_rope(log) -> list[dict]:
    rope = make_rope(bench.preset_config("qwen3-4b", 1))
    rows = []
    for norm in (False, True):
        norms = (mx.ones(128, mx.bfloat16), mx.ones(128, mx.bfloat16), 1e-6) if norm else None
        operands = [(mx.random.normal((1, 1, 32, 128), key=mx.random.key(i)).astype(mx.bfloat16),
                     mx.random.normal((1, 1, 8, 128), key=mx.random.key(100 + i)).astype(mx.bfloat16), norms)
                    for i in range(40)]
        mx.eval([o[:2] for o in operands])

        def run(choice):
            def call(_, q, k, norms):
                with kernels_choice(choice):
                    return kernels.rope(q, k, rope.inv_freq, rope.wavelengths, offset=1000, norms=norms)
            return call

        t_ours = time_per_call(run("custom"), operands, None)
        t_ref = time_per_call(run("reference"), operands, None)
        rows.append(dict(case=f"decode token, 32 q + 8 k heads{', with QK-norm' if norm else ''}",
                         ours_us=t_ours * 1e6, reference_us=t_ref * 1e6, speedup=t_ref / t_ours))
        log(f"rope {rows[-1]['case']:<45} ours {t_ours * 1e6:6.1f} us  reference ops {t_ref * 1e6:6.1f} us  "
            f"x{t_ref / t_ours:.2f}")
    return rows


def bench_gated_delta(shapes: dict, peak: float, log, copies: int = 48) -> list[dict]:
    """One decode token, bf16 q/k/v/beta, float32 g and state: the kernel vs the reference's MLX ops, calls cycling
    through `copies` states (48 x 2 MiB at 35B-A3B's batch 1: more than the L2 holds, as a model's 30 linear layers
    are). GB/s counts the state read and written, the one traffic that matters."""
    rows = []
    for name, shape in shapes.items():
        args = gated_delta_inputs(shape, mx.bfloat16, seed=0)
        operands = [(*args, gated_delta_state(shape, seed=i)) for i in range(copies)]
        mx.eval(operands)

        def ours(_, *operands):
            with kernels_choice("custom"):
                return kernels.gated_delta_step(*operands)

        def reference(_, *operands):
            return gated_delta_kernel.reference(*operands)

        moved = 2 * operands[0][-1].nbytes + sum(a.nbytes for a in args) + args[2].nbytes  # state in, out; y
        t_ours, t_ref = time_per_call(ours, operands, None), time_per_call(reference, operands, None)
        row = dict(shape=name, b=shape[0], hk=shape[1], hv=shape[2], dk=shape[3], dv=shape[4], ours_us=t_ours * 1e6,
                   reference_us=t_ref * 1e6, speedup=t_ref / t_ours, ours_gbs=moved / t_ours / 1e9,
                   reference_gbs=moved / t_ref / 1e9, ours_hbm_fraction=moved / t_ours / 1e9 / peak,
                   limit_us=moved / (peak * 1e9) * 1e6)
        rows.append(row)
        log(f"gated_delta {name:<16} ours {row['ours_us']:7.1f} us {row['ours_gbs']:6.0f} GB/s "
            f"({100 * row['ours_hbm_fraction']:4.1f}% HBM, limit {row['limit_us']:.1f} us)  reference ops "
            f"{row['reference_us']:7.1f} us {row['reference_gbs']:6.0f} GB/s  x{row['speedup']:.2f}")
        del operands
        mx.clear_cache()
    return rows


# 3. End to end


def end_to_end(preset: str, layers: int | None, prompt: int, gen: int, log) -> list[dict]:
    """Decode and prefill of a `preset`-shaped 4-bit model (all its layers, or `layers`) through qwen_mlx.bench.run."""
    rows = []
    for choice in ("custom", "reference"):
        with kernels_choice(choice):
            result = bench.run([preset], ["4"], [prompt], gen, layers=layers, repeats=3, log=log)
        for case in result["cases"]:
            engine = f"qwen-mlx ({choice} kernels)" if case["engine"] == "qwen-mlx" else "mlx-lm"
            rows.append(dict(engine=engine, decode_tps=case["decode_tps"], prefill_tps=case["prefill_tps"],
                             roofline_fraction=case["roofline_fraction"]))
    for row in rows:
        log(f"{preset} 4-bit decode  {row['engine']:<28} {row['decode_tps']:7.1f} tok/s  "
            f"prefill {row['prefill_tps']:8.0f} tok/s  {100 * row['roofline_fraction']:4.1f}% of HBM")
    return rows


def save(result: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--quick", action="store_true",
                        help="the grid that fits one device call: 4/8 bits, group 64, bf16/fp32, M 1 and 8, and "
                             "qmatmul once at each other width, group size and fp16 (about 80 kernel builds; the "
                             "full grid asks for about 530)")
    parser.add_argument("--parts", default="correctness,bench,e2e",
                        help="which parts to run, comma-separated (default: all three)")
    parser.add_argument("--hbm-gbs", type=float, help="peak memory bandwidth (default: from the GPU's name)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--moe-layers", type=int, default=4,
                        help="layers of the 30B-A3B-shaped end-to-end model (default 4; it has 48)")
    args = parser.parse_args(argv)
    log = print

    with kernels_choice("custom"):
        backend = kernels.backend()  # "custom" fails loudly without a GPU
    gpu, peak = hbm_gbs(args.hbm_gbs)
    log(f"MLX {mx.__version__}, kernels backend {backend}, {gpu}, HBM {peak:.0f} GB/s")
    if args.quick:
        bits, groups, dtypes, ms = (4, 8), (64,), ("bfloat16", "float32"), (1, 8)
    else:
        bits, groups, dtypes, ms = qmatmul_kernel.BITS, qmatmul_kernel.GROUP_SIZES, tuple(DTYPES), (1, 2, 4, 8)
    gather_bits = tuple(b for b in bits if b in (4, 8))
    result = {"schema": "qwen-mlx-device-check/5", "mlx_version": mx.__version__, "backend": backend, "gpu": gpu,
              "hbm_gbs": peak}
    parts = set(args.parts.split(","))
    failures = 0
    start = time.perf_counter()
    if "correctness" in parts:
        result["qmatmul"] = check_qmatmul(bits, groups, dtypes, ms, SHAPES, log)
        if args.quick:  # each other width, group size and dtype once (the 3/5/6-bit words straddle)
            for grid in QUICK_QMATMUL_EXTRA:
                result["qmatmul"] += check_qmatmul(*grid, SHAPES, log)
        result["gather_qmv"] = check_gather_qmv(gather_bits, groups, dtypes, ms, EXPERT_SHAPES, log)
        result["rope"] = check_rope(dtypes, log)
        result["router"] = check_router(dtypes, (1, 8, 512), log)
        result["gated_delta"] = check_gated_delta(dtypes, GATED_DELTA_SHAPES, GATED_DELTA_STEPS, log)
        result["fused"] = check_fused(gather_bits, groups, dtypes, ms, FUSED_MODELS,
                                      {k: v for k, v in EXPERT_SHAPES.items() if "gate/up" in k}, log)
        result["model"] = [check_model("qwen3-4b", log), check_model("qwen3-30b-a3b", log)]
        failures = sum(not r["ok"] for r in result["qmatmul"] + result["gather_qmv"] + result["rope"]
                       + result["router"] + result["gated_delta"] + result["fused"] + result["model"])
        log(f"correctness: {failures} failure(s) in {time.perf_counter() - start:.0f} s")
        save(result, args.json)  # what is done is kept should a later part run out of time
    if "bench" in parts:
        result["qmatmul_bench"] = bench_qmatmul(SHAPES, peak, log)
        result["qmatmul_crossover"] = crossover(result["qmatmul_bench"], backend)
        log(f"qmatmul crossover on {backend}: ours at least as fast up to M = "
            f"{result['qmatmul_crossover']['max_m']} (set qmatmul.DISPATCH_MAX_M[{backend!r}] to it; now "
            f"{result['qmatmul_crossover']['dispatch_max_m_now']})")
        result["gather_qmv_bench"] = bench_gather_qmv(GATHER_BENCH_SHAPES, GATHER_BENCH_CASES, peak, log)
        result["rope_bench"] = bench_rope(log)
        result["fused_bench"] = bench_fused(log)
        result["gated_delta_bench"] = bench_gated_delta(GATED_DELTA_BENCH_SHAPES, peak, log)
        save(result, args.json)
    if "e2e" in parts:
        result["end_to_end"] = end_to_end("qwen3-4b", None, args.prompt, args.gen, log)
        save(result, args.json)
        result["moe_end_to_end"] = end_to_end("qwen3-30b-a3b", args.moe_layers, args.prompt, args.gen, log)
    result["failures"] = failures
    result["seconds"] = time.perf_counter() - start
    save(result, args.json)
    if failures:
        log(f"FAILED: {failures} correctness mismatch(es), listed above as MISMATCH")
        return 1
    log("all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
