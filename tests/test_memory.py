"""The memory check before loading (weights + KV cache, a draft model's or MTP head's too, against the GPU's
recommended working set, --force) and the wired limit restored however a command ends. This machine's backend
reports no working set, so the tests give MLX a fake device info, as a Mac's GPU would report it."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from qwen_mlx import cli
from qwen_mlx.cache.kv import QuantizedKVCache, RotatingKVCache, make_cache
from qwen_mlx.engine.generate import prefill
from qwen_mlx.engine.speculative import DraftModel, MTPDraft
from qwen_mlx.weights.loader import _weight_bytes, check_memory, load_config, load_model, read_index
from qwen_mlx.weights.memory import MemoryCheckError, MemoryPlan, kv_cache_bytes

GiB = 2**30


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(budget): MLX reports `budget` bytes of recommended working set; returns the wired limits set."""
    state = {"limit": 0, "calls": []}

    def set_wired_limit(n):
        previous, state["limit"] = state["limit"], n
        state["calls"].append(n)
        return previous

    def install(budget: int) -> dict:
        monkeypatch.setattr(mx, "device_info", lambda *a: {"max_recommended_working_set_size": budget})
        monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
        return state

    return install


@pytest.mark.parametrize("variant", ["qwen3", "qwen2", "qwen3_moe"])
def test_weight_estimate_is_what_loading_allocates(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    model, _ = load_model(path)
    loaded = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    weights, element = _weight_bytes(read_index(path), None)
    assert weights == loaded and element == 4
    assert _weight_bytes(read_index(path), mx.bfloat16) == (loaded // 2, 2)


def test_weight_estimate_of_a_quantized_checkpoint(tiny_checkpoint, tmp_path):
    from qwen_mlx.weights.convert import convert

    out = convert(tiny_checkpoint("qwen3"), tmp_path / "q4", dtype="bf16", progress=False).path
    model, _ = load_model(out)
    assert _weight_bytes(read_index(out), None) == (sum(p.nbytes for _, p in tree_flatten(model.parameters())), 2)


@pytest.mark.parametrize("plan", [MemoryPlan(context=300), MemoryPlan(context=40),
                                  MemoryPlan(context=300, max_kv_size=64), MemoryPlan(context=300, kv_bits=8),
                                  MemoryPlan(context=300, kv_bits=4, kv_group_size=32, max_kv_size=100)],
                         ids=["float", "short", "rotating", "quantized", "rotating_quantized"])
def test_kv_estimate_is_what_the_cache_holds(tiny_checkpoint, plan):
    model, _ = load_model(tiny_checkpoint("qwen3"))
    cache = make_cache(model.config, max_size=plan.max_kv_size, bits=plan.kv_bits, group_size=plan.kv_group_size)
    prefill(model, mx.arange(plan.context), cache, chunk=64)
    assert kv_cache_bytes(model.config, plan, 4) == sum(c.nbytes for c in cache)


def test_load_refuses_past_the_budget_and_force_loads(tiny_checkpoint, fake_gpu):
    path = tiny_checkpoint("qwen3")
    plan = MemoryPlan(context=1000)
    weights, element = _weight_bytes(read_index(path), None)
    needed = weights + kv_cache_bytes(load_config(path), plan, element)
    fake_gpu(needed)
    load_model(path, memory=plan)  # exactly at the budget: fits
    fake_gpu(needed - 1)
    with pytest.raises(MemoryCheckError) as e:
        load_model(path, memory=plan)
    assert str(e.value).startswith(f"{path}: needs about") and "pass --force" in str(e.value)
    load_model(path, memory=MemoryPlan(context=1000, force=True))
    load_model(path)  # no plan, no check (the Python API's default)


def test_cli_refuses_with_a_message_naming_force(tiny_checkpoint, fake_gpu, capsys):
    path = str(tiny_checkpoint("qwen3"))
    wired = fake_gpu(2**20)
    assert cli.main(["generate", "-m", path, "-p", "hi", "--max-tokens", "2", "--temp", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qwen-mlx: error: {path}: needs about")
    assert "than the 0.0 GiB this GPU can use without paging" in err[0] and "--force" in err[0]
    assert wired == {"limit": 0, "calls": [2**20, 0]}  # raised, then restored on the error path

    assert cli.main(["generate", "-m", path, "-p", "hi", "--max-tokens", "2", "--temp", "0", "--force"]) == 0
    assert capsys.readouterr().out.strip()
    assert wired == {"limit": 0, "calls": [2**20, 0] * 2}

    assert cli.main(["chat", "-m", path, "--no-history"]) == 2  # refused before the app starts
    assert "--force" in capsys.readouterr().err
    assert cli.main(["bench", "--preset", "qwen3-0.6b", "--layers", "1", "--no-mlx-lm", "--bandwidth", "100"]) == 2
    assert "preset qwen3 4: needs about" in capsys.readouterr().err
    assert wired["limit"] == 0


def test_wired_limit_is_restored_when_interrupted(tiny_checkpoint, fake_gpu, monkeypatch):
    from qwen_mlx.api import LLM

    def interrupted(*args, **kwargs):
        assert wired["limit"] == 64 * GiB  # raised while generating
        raise KeyboardInterrupt
        yield

    wired = fake_gpu(64 * GiB)
    monkeypatch.setattr(LLM, "stream", interrupted)
    assert cli.main(["generate", "-m", str(tiny_checkpoint("qwen3")), "-p", "hi"]) == 130
    assert wired == {"limit": 0, "calls": [64 * GiB, 0]}


def test_no_check_without_a_reported_working_set(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda *a: {"device_name": "cpu"})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: pytest.fail("the wired limit must not change"))
    load_model(tiny_checkpoint("qwen3"), memory=MemoryPlan(context=10**9))
    assert cli.main(["generate", "-m", str(tiny_checkpoint("qwen3")), "-p", "hi", "--max-tokens", "1"]) == 0


def test_kv_estimate_counts_the_recurrent_state_of_a_hybrid_model(hybrid_checkpoint):
    """Linear-attention layers hold a conv tail and a float32 state instead of K and V: the estimate counts each
    layer by its kind (measured on the caches make_cache builds, not from the formula)."""
    model, _ = load_model(hybrid_checkpoint("qwen3_5_moe"))
    plan = MemoryPlan(context=300)
    cache = make_cache(model.config)
    prefill(model, mx.arange(plan.context), cache, chunk=64)
    assert kv_cache_bytes(model.config, plan, 4) == sum(c.nbytes for c in cache)


def loaded_bytes(path, **options) -> int:
    model, _ = load_model(path, **options)
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


# `generate -p hi --max-tokens 2`: its context (the prompt's bytes, 64 for the template, the tokens) fits the KV
# cache's first step of 256 tokens: the plan below gives the same caches.
SHORT = ["-p", "hi", "--max-tokens", "2", "--temp", "0"]
SHORT_PLAN = MemoryPlan(context=256)


def test_cli_counts_the_draft_model(tiny_checkpoint, fake_gpu, monkeypatch, capsys):
    """A target that fits alone, with a draft that does not fit beside it: refused in one line naming the draft,
    before a weight of either is read; --force loads them. Both fit when the budget holds both, to the byte."""
    target, draft = tiny_checkpoint("qwen3"), tiny_checkpoint("qwen2")
    alone = loaded_bytes(target) + kv_cache_bytes(load_config(target), SHORT_PLAN, 4)
    both = alone + loaded_bytes(draft) + kv_cache_bytes(load_config(draft), SHORT_PLAN, 4)
    run = ["generate", "-m", str(target), *SHORT, "--draft-model", str(draft)]
    fake_gpu(alone)
    check_memory(target, SHORT_PLAN)  # the target fits alone
    with monkeypatch.context() as m:
        m.setattr(mx, "load", lambda *a, **k: pytest.fail("a weight was read"))
        assert cli.main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qwen-mlx: error: {target} with the draft model {draft}: needs about")
    assert "+ draft" in err[0] and "--force" in err[0]
    assert cli.main([*run, "--force"]) == 0
    assert capsys.readouterr().out.strip()
    fake_gpu(both)
    check_memory(target, SHORT_PLAN, draft=draft)
    fake_gpu(both - 1)
    with pytest.raises(MemoryCheckError):
        check_memory(target, SHORT_PLAN, draft=draft)


@pytest.mark.parametrize("window", [None, 64])
def test_draft_kv_estimate_is_what_its_cache_holds(tiny_checkpoint, window):
    """A draft model's cache follows the target's (8-bit KV in groups of 64, a window) with its own layers and
    head_dim (32, which 64 does not divide: groups of 32): the estimate under the target's plan is what it holds."""
    draft = DraftModel(load_model(tiny_checkpoint("qwen3"))[0])
    target = RotatingKVCache(window, 4, bits=8, group_size=64) if window else QuantizedKVCache(8, 64)
    draft.follow([target])
    prefill(draft.model, mx.arange(300), draft.cache, chunk=64)
    plan = MemoryPlan(context=300, max_kv_size=window, kv_bits=8, kv_group_size=64)
    assert kv_cache_bytes(draft.model.config, plan, 4) == sum(c.nbytes for c in draft.cache)


def test_cli_counts_the_mtp_head(hybrid_checkpoint, fake_gpu, monkeypatch, capsys):
    """The MTP head's weights and its KV cache count with --mtp only: at the model's bytes plus the head's weights
    the model fits and --mtp is refused; with the head's cache (measured) too, --mtp fits."""
    path = hybrid_checkpoint("qwen3_5", mtp=True)
    model, _ = load_model(path, mtp=True)
    head_weights = loaded_bytes(path, mtp=True) - loaded_bytes(path)
    element = model.model.embed_tokens.weight.dtype.size
    without = loaded_bytes(path) + kv_cache_bytes(model.config, SHORT_PLAN, element)
    head_cache = MTPDraft(model).cache  # a plain KV cache (the target's kind): 2 pairs fill its first step
    hidden = mx.zeros((1, 2, model.config.hidden_size))
    model.mtp(hidden, hidden, head_cache)
    fake_gpu(without + head_weights)
    check_memory(path, SHORT_PLAN)
    with monkeypatch.context() as m:
        m.setattr(mx, "load", lambda *a, **k: pytest.fail("a weight was read"))
        assert cli.main(["generate", "-m", str(path), *SHORT, "--mtp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qwen-mlx: error: {path} with its MTP head: needs about")
    assert "+ MTP head" in err[0]
    fake_gpu(without + head_weights + head_cache.nbytes)
    check_memory(path, SHORT_PLAN, mtp=True)
