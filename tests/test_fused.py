"""The kernels backend is decided once, at load: on the reference backend a decode step calls nothing of kernels.ops
(the model runs its own page), and QWEN_MLX_KERNELS is read once per load, not per op, whichever backend runs."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import mlx.core as mx
import pytest

from qwen_mlx.cache.kv import make_cache
from qwen_mlx.kernels import dialect
from qwen_mlx.kernels import ops as kernels
from qwen_mlx.models import fused
from qwen_mlx.models.qwen3 import Attention, SparseMoE, SwitchLinear
from qwen_mlx.weights.convert import convert
from qwen_mlx.weights.loader import load_model

OPS = [name for name, f in inspect.getmembers(kernels, inspect.isfunction) if f.__module__ == kernels.__name__]


@pytest.fixture(scope="module")
def quantized_moe(tiny_checkpoint, tmp_path_factory):
    """A 4-bit Qwen3-MoE checkpoint with a dense layer, head_dim 64 (the RoPE kernel's smallest) and a tied,
    quantized embedding: every layer form of models/fused.py in use."""
    out = tmp_path_factory.mktemp("quantized") / "moe-4bit"
    source = tiny_checkpoint("qwen3_moe", head_dim=64, tie_word_embeddings=True, mlp_only_layers=(1,))
    convert(source, out, bits=4, group_size=32, progress=False)
    return out


class Environ(dict):
    """os.environ as kernels.ops sees it, counting the reads of QWEN_MLX_KERNELS."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.reads = 0

    def get(self, key, default=None):
        self.reads += key == kernels.ENV
        return super().get(key, default)


@pytest.fixture
def environ(monkeypatch) -> Environ:
    environ = Environ({kernels.ENV: "reference"})
    monkeypatch.setattr(kernels, "os", SimpleNamespace(environ=environ))
    monkeypatch.setattr(kernels, "BACKEND", kernels.BACKEND)  # fuse sets it: restored after the test
    return environ


def decode_step(model) -> mx.array:
    cache = make_cache(model.config)
    model(mx.array([[1, 2, 3]]), cache)  # prefill
    logits = model(mx.array([[4]]), cache)  # one decode step
    mx.eval(logits)
    return logits


def test_reference_backend_decodes_without_calling_kernels_ops(quantized_moe, environ, monkeypatch):
    assert {"qmatmul", "gather_qmm", "linears", "swiglu", "expert_swiglu", "expert_sum", "route", "rope"} <= set(OPS)
    model, _ = load_model(quantized_moe)
    assert environ.reads == 1
    assert all(type(m) not in fused.GPU_FORMS.values() for _, m in model.named_modules())
    for name in OPS:
        monkeypatch.setattr(kernels, name, lambda *a, name=name, **kw: pytest.fail(f"kernels.ops.{name} called"))
    monkeypatch.setattr(dialect, "run", lambda *a: pytest.fail("a kernel launched"))
    decode_step(model)
    assert environ.reads == 1


def test_kernels_env_is_read_once_per_load_not_per_op(quantized_moe, environ, monkeypatch):
    """A model fused for a GPU (its kernels stubbed: zeros of their outputs' shapes) decodes without reading the
    environment again; each load reads it once."""
    launched = []
    monkeypatch.setattr(dialect, "run", lambda kernel, backend, launch: launched.append(kernel.name) or [
        mx.zeros(s, d) for s, d in zip(launch.output_shapes, launch.output_dtypes)])
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    environ[kernels.ENV] = "custom"
    model, _ = load_model(quantized_moe)
    assert environ.reads == 1 and kernels.BACKEND == "cuda"
    assert isinstance(model.layers[0].self_attn, fused.FusedAttention)
    decode_step(model)
    assert environ.reads == 1
    assert set(launched) == {"qwen_qmatmul_parts3", "qwen_rope", "qwen_qmatmul", "qwen_qmatmul_swiglu",
                             "qwen_router", "qwen_gather_qmv_swiglu", "qwen_gather_qmv_sum"}
    load_model(quantized_moe)
    assert environ.reads == 2


def test_fuse_swaps_the_forms_both_ways_and_leaves_other_classes(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(kernels, "BACKEND", kernels.BACKEND)
    model, _ = load_model(tiny_checkpoint("qwen3_moe"))
    attention, moe = model.layers[0].self_attn, model.layers[0].mlp

    class Shard(SparseMoE):  # a layer swapped in from elsewhere (a distributed shard)
        pass

    model.layers[1].mlp.__class__ = Shard
    fused.fuse(model, "metal")
    assert (type(attention), type(moe), type(model.layers[1].mlp)) == (fused.FusedAttention, fused.FusedSparseMoE,
                                                                        Shard)
    assert kernels.BACKEND == "metal"
    fused.fuse(model, "reference")
    assert (type(attention), type(moe)) == (Attention, SparseMoE) and kernels.BACKEND == "reference"


def test_an_expert_shard_keeps_the_fused_router_and_experts(tiny_checkpoint, monkeypatch):
    """Expert parallel swaps only each MoE layer's switch_mlp (distributed.shard.ExpertShard): fused for a GPU, the layer
    still routes with the router kernel and the held experts run the fused expert forms."""
    from qwen_mlx.distributed.shard import ExpertShard

    monkeypatch.setattr(kernels, "BACKEND", kernels.BACKEND)
    model, _ = load_model(tiny_checkpoint("qwen3_moe"))
    moe = model.layers[0].mlp
    moe.switch_mlp = ExpertShard(moe.switch_mlp, range(0, model.config.num_experts), mx.distributed.init())
    fused.fuse(model, "cuda")
    assert (type(moe), type(moe.switch_mlp.held)) == (fused.FusedSparseMoE, fused.FusedSwitchMLP)


def test_a_bfloat16_moe_runs_on_the_cpu_through_its_float32_expert_form(tiny_checkpoint, monkeypatch):
    """MLX's CPU GatherMM is float32-only: on the CPU, fuse gives the float experts a float32 product; the page's
    own SwitchLinear (bf16 on the CPU) is refused by MLX."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU's float32-only GatherMM")
    monkeypatch.setattr(kernels, "BACKEND", kernels.BACKEND)
    model, _ = load_model(tiny_checkpoint("qwen3_moe", "bfloat16"))
    assert type(model.layers[0].mlp.switch_mlp.down_proj) is fused.Float32SwitchLinear
    assert decode_step(model).dtype == mx.bfloat16
    for experts in (layer.mlp.switch_mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE)):
        experts.gate_up_proj.__class__ = experts.down_proj.__class__ = SwitchLinear  # the page's own form
    with pytest.raises(RuntimeError, match="float32"):
        decode_step(model)


def test_the_cpu_prefills_the_delta_rule_in_its_own_chunks_with_the_same_logits(hybrid_checkpoint, monkeypatch):
    """On the CPU, fuse gives the Gated DeltaNet layers chunks of 16 (CpuGatedDeltaNet); a prompt longer than 64
    tokens then gives the logits of the page's chunks of 64."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU's chunk size")
    monkeypatch.setattr(kernels, "BACKEND", kernels.BACKEND)
    model, _ = load_model(hybrid_checkpoint("qwen3_5"))
    mixers = [layer.linear_attn for layer in model.layers if layer.is_linear]
    assert mixers and all(type(m) is fused.CpuGatedDeltaNet and m.chunk == 16 for m in mixers)
    tokens = mx.array([[(7 * t + 3) % 1000 for t in range(100)]])
    cpu = model(tokens)
    for m in mixers:
        m.chunk = 64
    assert mx.abs(cpu - model(tokens)).max().item() <= 1e-4
