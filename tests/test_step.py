"""The compiled decode step (engine/step.py) against the eager reference: the model op by op over the same caches.

Both paths decode the same tokens from equal prefilled caches; the compiled one must actually run (a forward that
always fell back would pass trivially), give the reference's greedy tokens and its logits within a tolerance per
dtype (float32: 1e-4, the parity suite's bound; bfloat16: 0.1, a few ulps of logits spanning about +-10), across
a buffer growth (256 slots) and a rotating window's wrap-around, under every cache kind and sampler.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from helpers import prompt_ids

from qwen_mlx.cache.kv import KVCache, RotatingKVCache, make_cache
from qwen_mlx.engine import step
from qwen_mlx.engine.generate import decode_forward, generate_tokens, prefill
from qwen_mlx.engine.sampling import SamplingParams, make_sampler
from qwen_mlx.engine.step import compiled_forward
from qwen_mlx.weights.loader import load_model

GS = 32  # the tiny models' head_dim is 32
KINDS = {"plain": {}, "quantized": dict(bits=8, group_size=GS), "rotating": dict(max_size=40, keep=4),
         "rotating-quantized": dict(max_size=40, keep=4, bits=4, group_size=GS)}
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}


def decode_both(model, prompt: list[int], n: int, kind: dict) -> tuple[list[int], list[int], float]:
    """Greedy-decode n tokens after `prompt` eagerly and compiled, each on its own cache; both paths' tokens and
    the largest logit difference (while the tokens agree, both paths see the same inputs)."""
    runs = []
    for compiled in (False, True):
        cache = make_cache(model.config, **kind)
        ids = mx.array(prompt, dtype=mx.uint32)
        prefill(model, ids[:-1], cache)
        fast = compiled_forward(model, cache)
        forward = decode_forward(model, cache, compiled=False)
        token, tokens, rows = ids[-1:], [], []
        for _ in range(n):
            logits = fast(token) if compiled else forward(token)
            assert logits is not None  # the compiled step ran
            token = mx.argmax(logits, axis=-1)
            tokens.append(token.item())
            rows.append(np.array(logits))
        runs.append((tokens, np.concatenate(rows)))
    (eager, eager_logits), (fast_tokens, fast_logits) = runs
    return eager, fast_tokens, float(np.abs(eager_logits - fast_logits).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["qwen3", "qwen3_moe"])
def test_compiled_step_equals_eager_under_every_cache_kind(tiny_checkpoint, variant, kind):
    """A 250-token prompt and 12 tokens cross the buffer's growth at 256; the 40-token window has long wrapped."""
    model, _ = load_model(tiny_checkpoint(variant))
    eager, fast, diff = decode_both(model, prompt_ids(250, seed=3).tolist(), 12, KINDS[kind])
    assert fast == eager and diff <= TOLERANCE["float32"], (diff, eager, fast)


@pytest.mark.parametrize("kind", [pytest.param({}, marks=pytest.mark.slow),  # 3 s each: the default run keeps one
                                  pytest.param(dict(bits=8, group_size=GS), marks=pytest.mark.slow),
                                  dict(max_size=24, keep=2)])
def test_compiled_step_in_bfloat16_from_a_short_prompt(tiny_checkpoint, kind):
    """Attention reads 64 slots, then 128 (a prefix of the 256-slot buffer); the 24-token window wraps."""
    model, _ = load_model(tiny_checkpoint("qwen3", "bfloat16"))
    eager, fast, diff = decode_both(model, prompt_ids(6, seed=4).tolist(), 70, kind)
    assert fast == eager and diff <= TOLERANCE["bfloat16"], (diff, eager, fast)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=7),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=8),
    SamplingParams(repetition_penalty=1.5),  # greedy with a penalty
])
def test_every_sampler_gives_the_same_tokens_compiled(tiny_checkpoint, params):
    model, _ = load_model(tiny_checkpoint("qwen3"))
    prompt = prompt_ids(12, seed=5).tolist()
    runs = [list(generate_tokens(model, prompt, make_cache(model.config), sampler=make_sampler(params),
                                 max_tokens=24, compiled=compiled)) for compiled in (False, True)]
    assert runs[0] == runs[1]


def test_where_the_compiled_step_does_not_apply_it_falls_back(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen3"))
    token = mx.array([5], dtype=mx.uint32)
    assert compiled_forward(model, make_cache(model.config))(token) is None  # an empty cache: no storage yet
    mixed = [KVCache(), RotatingKVCache(40)]
    prefill(model, mx.array([1, 2, 3], dtype=mx.uint32), mixed)
    assert compiled_forward(model, mixed)(token) is None  # not one kind
    assert compiled_forward(model, mixed)(mx.array([5, 6], dtype=mx.uint32)) is None  # not one token
    assert mixed[0].offset == mixed[1].offset == 3  # nothing was run
    # generate_tokens then runs the eager forward: a 1-token prompt starts on an empty cache
    reference = list(generate_tokens(model, [9], make_cache(model.config), max_tokens=8, compiled=False))
    assert list(generate_tokens(model, [9], make_cache(model.config), max_tokens=8)) == reference


def test_traces_are_kept_with_the_model_and_go_with_it(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen3"))
    key = id(model)
    list(generate_tokens(model, [1, 2, 3], make_cache(model.config), max_tokens=4))
    assert len(step._traces[key]) == 1  # one buffer size, one reach
    list(generate_tokens(model, [4, 5, 6], make_cache(model.config), max_tokens=4))
    assert len(step._traces[key]) == 1  # reused by the next generation
    del model
    gc.collect()
    assert key not in step._traces  # a trace holds the model weakly: nothing keeps it alive
