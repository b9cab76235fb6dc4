"""Long runs on tiny models: memory must stay flat."""

import gc
import resource

import mlx.core as mx
import pytest

import qwen_mlx
from qwen_mlx.cache.kv import make_cache
from qwen_mlx.weights.loader import load_model

pytestmark = pytest.mark.slow  # minutes of repetition: CI runs them (-m "slow or not slow"), a plain pytest does not


def rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_200_load_unload_cycles_do_not_grow_memory(tiny_checkpoint):
    """Loader and model: 200 loads of a small-vocabulary checkpoint, each used once and dropped."""
    path = tiny_checkpoint("qwen3_moe", vocab_size=1000)

    def cycle():
        model, _ = load_model(path)
        mx.eval(model(mx.array([[1, 2, 3]]), make_cache(model.config)))
        del model
        gc.collect()
        mx.clear_cache()

    for _ in range(5):  # warm up allocator pools and caches
        cycle()
    active, rss = mx.get_active_memory(), rss_kib()
    for _ in range(200):
        cycle()
    assert mx.get_active_memory() <= active * 1.01 + 1024
    assert rss_kib() <= rss * 1.01 + 4096


def test_full_load_and_generate_cycles_do_not_grow_memory(tiny_checkpoint):
    """The whole public path (tokenizer, template, generation) a few times over."""
    path = tiny_checkpoint("qwen3")

    def cycle():
        llm = qwen_mlx.load(path)
        llm.generate("hi", max_tokens=2, think=False)
        del llm
        gc.collect()
        mx.clear_cache()

    for _ in range(3):
        cycle()
    active, rss = mx.get_active_memory(), rss_kib()
    for _ in range(20):
        cycle()
    assert mx.get_active_memory() <= active * 1.01 + 1024
    assert rss_kib() <= rss * 1.01 + 4096
