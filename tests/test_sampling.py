"""Samplers against a NumPy reference on fixed logits."""

import json

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx.engine.sampling import SamplingParams, apply_repetition_penalty, filter_logits, make_sampler

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0, 2, (1, 50)).astype(np.float32)
NO_HISTORY = mx.array([], mx.uint32)


def numpy_keep(logits, top_k, top_p, min_p):
    x = logits[0].astype(np.float64)
    keep = np.ones_like(x, bool)
    if top_k:
        keep &= x >= np.sort(x)[-top_k]
    z = np.where(keep, x, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
    if min_p:
        keep &= p >= min_p * p.max()
    return keep


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.3, 0.0),
                                               (0, 1.0, 0.2), (20, 0.95, 0.05), (1, 0.5, 0.0)])
def test_masks_equal_numpy(top_k, top_p, min_p):
    got = np.isfinite(np.array(filter_logits(mx.array(LOGITS), top_k, top_p, min_p)))[0]
    expected = numpy_keep(LOGITS, top_k, top_p, min_p)
    assert got.tolist() == expected.tolist()
    assert got.sum() >= 1


def test_repetition_penalty_equals_numpy():
    history = [3, 3, 7, 10, 49]
    expected = LOGITS.copy()
    for t in set(history):
        expected[0, t] = expected[0, t] / 1.3 if expected[0, t] > 0 else expected[0, t] * 1.3
    for recent in (history, mx.array(history)):  # a list, or the decode loop's lazy array
        got = np.array(apply_repetition_penalty(mx.array(LOGITS), recent, 1.3))
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_temperature_zero_is_argmax_and_seeded_runs_reproduce():
    logits = mx.array(LOGITS)
    assert make_sampler(SamplingParams(temperature=0))(logits, NO_HISTORY).item() == int(LOGITS.argmax())
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=42)
    sampler = make_sampler(params)
    first = [sampler(logits, NO_HISTORY).item() for _ in range(30)]
    again = make_sampler(params)
    assert [again(logits, NO_HISTORY).item() for _ in range(30)] == first
    assert len(set(first)) > 3  # it samples, it does not just repeat the argmax
    other = make_sampler(SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=43))
    assert [other(logits, NO_HISTORY).item() for _ in range(30)] != first


def test_sampled_tokens_stay_inside_the_mask():
    sampler = make_sampler(SamplingParams(temperature=1.5, top_k=4, seed=0))
    allowed = set(np.argsort(-LOGITS[0])[:4].tolist())
    assert {sampler(mx.array(LOGITS), NO_HISTORY).item() for _ in range(100)} <= allowed


def test_defaults_follow_the_checkpoint_and_qwen3_recommendations(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.5,
                                                                 "top_k": 30, "top_p": 0.9}))
    think = SamplingParams.for_checkpoint(tmp_path, thinking=True)
    assert (think.temperature, think.top_k, think.top_p, think.min_p) == (0.5, 30, 0.9, 0.0)
    plain = SamplingParams.for_checkpoint(tmp_path, thinking=False, seed=1)
    assert (plain.temperature, plain.top_k, plain.top_p, plain.seed) == (0.7, 20, 0.8, 1)
