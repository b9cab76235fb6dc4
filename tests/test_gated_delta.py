"""The gated-delta decode step: its reference against transformers' own recurrence, its kernel's text run on the CPU
(tests/kernel_emulator.py) against the reference, a broken variant caught, and the op's dispatch. The CUDA and
Metal builds are compiled in test_kernels.py (LAUNCHES["gated_delta"]); on a GPU: scripts/device_check.py."""

from __future__ import annotations

import kernel_emulator
import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

from qwen_mlx.kernels import dialect
from qwen_mlx.kernels import gated_delta as kernel
from qwen_mlx.kernels import ops as kernels
from qwen_mlx.kernels.dialect import Kernel

# Qwen3.5-35B-A3B's linear attention (its config.json: linear_num_key_heads 16, linear_num_value_heads 32,
# linear_key_head_dim 128, linear_value_head_dim 128); then small odd shapes: a partial block of 32 columns,
# Dk != Dv, one key head serving 3 value heads, batch 2.
QWEN35_35B_A3B = (1, 16, 32, 128, 128)  # (B, Hk, Hv, Dk, Dv)
ODD = [(2, 1, 3, 5, 7), (1, 2, 4, 24, 40), (2, 3, 3, 16, 33)]


def l2norm(x: mx.array) -> mx.array:
    """transformers' l2norm (eps 1e-6 inside the rsqrt), in float32."""
    x = x.astype(mx.float32)
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + 1e-6)


def inputs(b: int, hk: int, hv: int, dk: int, dv: int, steps: int, seed: int):
    """`steps` tokens of raw (unnormalised) q, k, v (steps, B, H, D), g (steps, B, Hv) as the model computes it
    (-exp(A_log) * softplus(a + dt_bias)), beta = sigmoid(b), and a non-zero starting state (B, Hv, Dk, Dv)."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((steps, b, hk, dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((steps, b, hv, dv)).astype(np.float32)
    a_log, dt_bias = rng.uniform(-1, 1, hv), rng.uniform(-1, 1, hv)
    g = (-np.exp(a_log) * np.log1p(np.exp(rng.standard_normal((steps, b, hv)) + dt_bias))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((steps, b, hv))))).astype(np.float32)
    state = (rng.standard_normal((b, hv, dk, dv)) * 0.1).astype(np.float32)
    return q, k, v, g, beta, state


def step_inputs(q, k, v, g, beta, t: int, dtype=mx.float32):
    """Token t as the op takes it: q and k L2-normalised, q scaled by Dk**-0.5, in `dtype` (g float32)."""
    dk = q.shape[-1]
    qn, kn = l2norm(mx.array(q[t])) * dk ** -0.5, l2norm(mx.array(k[t]))
    return qn.astype(dtype), kn.astype(dtype), mx.array(v[t]).astype(dtype), mx.array(g[t]), \
        mx.array(beta[t]).astype(dtype)


@pytest.mark.parametrize("shape", [QWEN35_35B_A3B, *ODD], ids=["35b-a3b", "odd-1", "odd-2", "odd-3"])
def test_reference_equals_transformers_recurrence(shape):
    """Six tokens, each a step of the reference from the previous step's state, against transformers'
    torch_recurrent_gated_delta_rule over the six tokens at once (its own L2 norm and q scaling)."""
    b, hk, hv, dk, dv = shape
    q, k, v, g, beta, state = inputs(*shape, steps=6, seed=sum(shape))
    as_torch = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, 0, 1)))  # (B, T, ...)
    expected, expected_state = torch_recurrent_gated_delta_rule(
        as_torch(q), as_torch(k), as_torch(v), as_torch(g), as_torch(beta), initial_state=torch.from_numpy(state),
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    s = mx.array(state)
    for t in range(6):
        y, s = kernel.reference(*step_inputs(q, k, v, g, beta, t), s)
        assert y.shape == (b, hv, dv) and y.dtype == mx.float32 and s.dtype == mx.float32
        np.testing.assert_allclose(np.array(y), expected[:, t].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(s), expected_state.numpy(), atol=1e-5, rtol=1e-5)


def test_reference_keeps_the_state_in_float32_and_y_in_v_dtype():
    q, k, v, g, beta, state = inputs(1, 2, 4, 8, 8, steps=1, seed=0)
    y, s = kernel.reference(*step_inputs(q, k, v, g, beta, 0, mx.bfloat16), mx.array(state))
    assert (y.dtype, s.dtype) == (mx.bfloat16, mx.float32)


# The kernel's own text on the CPU

needs_gxx = pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed (it builds the "
                               "kernels' text for the CPU emulator)")
TOLERANCE = {mx.float32: 1e-5, mx.bfloat16: 4e-3}  # y: float32's sums in another order; one bf16 rounding


def error(got: mx.array, expected: mx.array) -> float:
    """max |got - expected| / max |expected|."""
    expected = expected.astype(mx.float32)
    return (mx.abs(got.astype(mx.float32) - expected).max() / mx.abs(expected).max()).item()


def emulated_steps(body: Kernel, shape, dtype, steps: int, seed: int):
    """`steps` tokens through the emulated kernel and through the reference, each carrying its own state:
    the worst relative errors of y and of the state over the steps."""
    q, k, v, g, beta, state = inputs(*shape, steps=steps, seed=seed)
    ours = theirs = mx.array(state)
    worst_y = worst_state = 0.0
    for t in range(steps):
        args = step_inputs(q, k, v, g, beta, t, dtype)
        assert kernel.supports(*args, ours)
        y, ours = kernel_emulator.run([(body, kernel.launch(*args, ours))])[0]
        y_ref, theirs = kernel.reference(*args, theirs)
        assert (y.shape, y.dtype, ours.shape, ours.dtype) == (y_ref.shape, y_ref.dtype, theirs.shape, mx.float32)
        worst_y, worst_state = max(worst_y, error(y, y_ref)), max(worst_state, error(ours, theirs))
    return worst_y, worst_state


@needs_gxx
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [QWEN35_35B_A3B, *ODD], ids=["35b-a3b", "odd-1", "odd-2", "odd-3"])
def test_emulated_kernel_equals_reference(shape, dtype):
    """Four tokens, each from the previous token's state; bf16 q, k, v, beta as the model hands them (g float32).
    The state is float32 on both sides: within 1e-5 whatever the input dtype; y within the output's rounding."""
    worst_y, worst_state = emulated_steps(kernel.KERNEL, shape, dtype, steps=4, seed=len(shape))
    assert worst_y <= TOLERANCE[dtype] and worst_state <= 1e-5, (worst_y, worst_state)


def broken(old: str, new: str) -> Kernel:
    assert old in kernel.BODY
    return Kernel(kernel.KERNEL.name, kernel.KERNEL.inputs, kernel.KERNEL.outputs, kernel.BODY.replace(old, new))


@needs_gxx
@pytest.mark.parametrize("variant", [
    ("(head % HV) / (HV / HK)", "(head % HV) % HK"),  # value head h reads key head h % Hk instead of h // 2
    ("s[i] += static_cast<float>(k[qk + i]) * delta;\n    state_out[s0 + size_t(i) * DV] = s[i];",
     "state_out[s0 + size_t(i) * DV] = s[i];\n    s[i] += static_cast<float>(k[qk + i]) * delta;"),  # the old S
], ids=["key-head-mapping", "state-before-update"])
def test_emulation_catches_a_broken_kernel(variant):
    worst_y, worst_state = emulated_steps(broken(*variant), QWEN35_35B_A3B, mx.float32, steps=2, seed=3)
    assert worst_y > 1e-2 or worst_state > 1e-2


# The op's dispatch


def test_op_runs_the_reference_on_cpu_and_one_launch_on_a_gpu(monkeypatch):
    q, k, v, g, beta, state = inputs(1, 2, 4, 16, 40, steps=1, seed=1)
    args = (*step_inputs(q, k, v, g, beta, 0, mx.bfloat16), mx.array(state))
    y, s = kernels.gated_delta_step(*args)
    y_ref, s_ref = kernel.reference(*args)
    assert mx.array_equal(y, y_ref) and mx.array_equal(s, s_ref)
    calls = []
    monkeypatch.setattr(kernels, "BACKEND", "cuda")
    monkeypatch.setattr(dialect, "run", lambda kernel, backend, launch: calls.append((kernel, backend, launch))
                        or [mx.zeros(s, d) for s, d in zip(launch.output_shapes, launch.output_dtypes)])
    y, s = kernels.gated_delta_step(*args)
    ((body, backend, launch),) = calls
    assert (body, backend) == (kernel.KERNEL, "cuda") and (y.shape, s.shape) == ((1, 4, 40), (1, 4, 16, 40))
    assert dict(launch.template) == {"T": mx.bfloat16, "TG": mx.float32, "TB": mx.bfloat16, "HK": 2, "HV": 4,
                                     "DK": 16, "DV": 40}
    assert launch.grid == (1 * 4 * 2 * 32, 1, 1) and launch.threadgroup == (32, 1, 1)
    # Outside the kernel's cover, the reference: Dk past a lane's registers, a bf16 state, value heads that are
    # not a multiple of the key heads.
    wide = inputs(1, 1, 1, 256, 8, steps=1, seed=2)
    kernels.gated_delta_step(*step_inputs(*wide[:5], 0), mx.array(wide[5]))
    kernels.gated_delta_step(*args[:5], args[5].astype(mx.bfloat16))
    assert not kernel.supports(*args[:2], args[2][:, :3], args[3][:, :3], args[4][:, :3], args[5][:, :3])  # 2 : 3
    assert len(calls) == 1


# A whole hybrid model's decode through the emulated kernel

def tiny_qwen3_5():
    """A tiny random Qwen3.5 text model in transformers, float32: value heads 2x key heads, Dk 16 != Dv 24, a
    non-default layer order."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=16,
                               linear_value_head_dim=24, linear_num_key_heads=2, linear_num_value_heads=4,
                               layer_types=["linear_attention", "full_attention", "linear_attention",
                                            "linear_attention"])
    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(config).eval()


def through_kernel(body: Kernel, calls: list):
    """transformers' recurrence replaced by `body` run in the emulator: its decode step (one token from a cached
    state), with transformers' own L2 norm and q scaling before it."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import l2norm as torch_l2norm

    def recurrence(query, key, value, g, beta, initial_state=None, output_final_state=False,
                   use_qk_l2norm_in_kernel=False, **_):
        assert query.shape[1] == 1 and initial_state is not None and use_qk_l2norm_in_kernel
        q, k = (torch_l2norm(a[:, 0].float(), dim=-1, eps=1e-6) for a in (query, key))  # (B, Hk, Dk)
        as_mx = lambda t: mx.array(t.detach().float().contiguous().numpy())
        args = [as_mx(q / q.shape[-1] ** 0.5), as_mx(k), as_mx(value[:, 0]), as_mx(g[:, 0]), as_mx(beta[:, 0]),
                as_mx(initial_state)]
        assert kernel.supports(*args)
        y, state = kernel_emulator.run([(body, kernel.launch(*args))])[0]
        calls.append(body)
        return torch.from_numpy(np.array(y))[:, None].to(query.dtype), torch.from_numpy(np.array(state))
    return recurrence


@needs_gxx
@pytest.mark.slow  # ~12 s alone, ~25 s on a loaded machine: transformers' generate, twice
def test_tiny_qwen3_5_decodes_the_same_tokens_through_the_emulated_kernel(monkeypatch):
    """32 greedy tokens of a tiny Qwen3.5 in transformers, every decode step of its 3 linear-attention layers
    through the kernel's text (the prompt takes transformers' chunked form): the same tokens as transformers' own
    recurrence, logits within 1e-4. With the kernel's key-head mapping broken, the logits move."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    model, prompt = tiny_qwen3_5(), torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))

    def generate(tokens: int):
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=tokens, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        return out.sequences[0, 8:], torch.stack(out.logits)

    expected, expected_logits = generate(32)
    calls = []
    monkeypatch.setattr(modeling_qwen3_5, "torch_recurrent_gated_delta_rule", through_kernel(kernel.KERNEL, calls))
    tokens, logits = generate(32)
    assert len(calls) == 31 * 3  # every decode step after the prompt, in each linear layer
    assert tokens.tolist() == expected.tolist()
    assert (logits - expected_logits).abs().max().item() <= 1e-4
    monkeypatch.setattr(modeling_qwen3_5, "torch_recurrent_gated_delta_rule", through_kernel(
        broken("(head % HV) / (HV / HK)", "(head % HV) % HK"), calls))
    _, logits = generate(4)
    assert (logits - expected_logits[:4]).abs().max().item() > 1e-3
