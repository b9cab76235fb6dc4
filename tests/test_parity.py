"""Our model against transformers (torch CPU) and mlx-lm on the same tiny random checkpoints.

Tolerances: fp32 logits max abs diff <= 1e-4 (logits here span about +-50). bf16: both sides round differently at
every layer, so bf16 is judged against the fp32 truth (transformers in fp32 on the same bf16 weights): our bf16
error there must be no worse than transformers' own bf16 error (median over positions <= 1.25x, max <= 1.5x),
and the argmax agrees with fp32 at >= 90% of positions. Measured: ours/transformers max error 0.75/0.58 (qwen3),
0.73/0.71 (qwen2), 0.37/0.37 (yarn), 0.81/3.76 (moe: an expert flip in transformers' bf16).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import greedy_mlx_lm, greedy_ours, greedy_transformers, prompt_ids

from qwen_mlx.weights.loader import load_model

VARIANTS = ["qwen3", "qwen2", "qwen3_yarn", "qwen3_moe"]


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].float().numpy()


@pytest.mark.parametrize("variant,overrides", [(v, {}) for v in VARIANTS] + [("qwen3_moe", {"norm_topk_prob": False})])
def test_fp32_logits_equal_transformers(tiny_checkpoint, variant, overrides):
    path = tiny_checkpoint(variant, **overrides)
    ids = prompt_ids(64)
    ours = np.array(load_model(path)[0](mx.array(ids)[None])[0])
    ref = hf_logits(hf_model(path), ids)
    assert ours.shape == ref.shape == (64, 151936)
    assert np.abs(ref).max() > 10  # spread-out logits, so the bound below means something
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_logits_close_to_transformers(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant, "bfloat16")
    ids = prompt_ids(64)
    model, _ = load_model(path)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    ours = np.array(model(mx.array(ids)[None])[0].astype(mx.float32))
    truth = hf_logits(hf_model(path, torch.float32), ids)
    theirs = hf_logits(hf_model(path, torch.bfloat16), ids)
    ours_err, their_err = np.abs(ours - truth).max(-1), np.abs(theirs - truth).max(-1)  # per position
    assert np.median(ours_err) <= 1.25 * np.median(their_err)
    assert ours_err.max() <= 1.5 * their_err.max()
    assert (ours.argmax(-1) == truth.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("variant,overrides", [(v, {}) for v in VARIANTS] + [("qwen3_moe", {"norm_topk_prob": False})])
def test_greedy_tokens_equal_transformers_and_mlx_lm(tiny_checkpoint, variant, overrides):
    """The plain loop (helpers.greedy_ours) and the engine's loop (chunked prefill, the overlap) give the tokens
    of transformers and mlx-lm."""
    from qwen_mlx.cache.kv import make_cache
    from qwen_mlx.engine.generate import generate_tokens

    path = tiny_checkpoint(variant, **overrides)
    prompt = prompt_ids(12, seed=2)
    model = load_model(path)[0]
    ours = greedy_ours(model, prompt, 32)
    assert list(generate_tokens(model, prompt.tolist(), make_cache(model.config), max_tokens=32,
                                prefill_chunk=5)) == ours
    assert greedy_transformers(hf_model(path), prompt, 32) == ours
    assert greedy_mlx_lm(path, prompt, 32) == ours
    assert len(set(ours)) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decode_equals_full_forward(tiny_checkpoint, variant):
    """Prefill 20 tokens, then feed 30 more one at a time (positions beyond 2x the prefill): each step's logits
    equal the full forward pass at that position. The 64-token YaRN original context is crossed too."""
    from qwen_mlx.cache.kv import make_cache

    model, _ = load_model(tiny_checkpoint(variant))
    ids = prompt_ids(70, seed=3)
    full = np.array(model(mx.array(ids)[None])[0])
    cache = make_cache(model.config)
    steps = [np.array(model(mx.array(ids[:20])[None], cache)[0])]
    for t in range(20, 70):
        steps.append(np.array(model(mx.array(ids[t : t + 1])[None], cache)[0]))
    incremental = np.concatenate(steps)
    assert cache[0].offset == 70
    assert np.abs(incremental - full).max() <= 1e-4


def test_chunked_prefill_equals_one_pass(tiny_checkpoint):
    """Multi-token steps on a non-empty cache use the offset causal mask."""
    from qwen_mlx.cache.kv import make_cache

    model, _ = load_model(tiny_checkpoint("qwen3"))
    ids = prompt_ids(300, seed=4)  # crosses the cache's 256-token growth step
    # the final hidden states (the head is the same matrix for both: 300 rows of it cost seconds on a CPU)
    full = np.array(model.model(mx.array(ids)[None], None)[0])
    cache = make_cache(model.config)
    chunks = [np.array(model.model(mx.array(ids[a:b])[None], cache)[0]) for a, b in ((0, 100), (100, 257), (257, 300))]
    assert np.abs(np.concatenate(chunks) - full).max() <= 1e-5 * np.abs(full).max() + 1e-6
