"""Samplers: greedy, temperature, top-k, top-p, min-p and a repetition penalty, seeded."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from qwen_mlx.engine.generate import Sampler

# Qwen3's recommended settings (model card): thinking turns, and non-thinking turns.
QWEN3_THINKING = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
QWEN3_NON_THINKING = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; > 1 makes tokens seen in the last `repetition_context` less likely
    repetition_context: int = 64
    seed: int | None = None

    @classmethod
    def for_checkpoint(cls, path: str | Path, *, thinking: bool, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json settings for thinking turns; Qwen3's recommended
        non-thinking settings for non-thinking turns (the checkpoint file states only one set)."""
        base = dict(QWEN3_THINKING if thinking else QWEN3_NON_THINKING)
        file = Path(path) / "generation_config.json"
        if thinking and file.is_file():
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                config = {}
            if isinstance(config, dict) and config.get("do_sample", True):
                for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
                    if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
                        base[key] = config[key]
        return replace(cls(**base), **overrides)


def make_sampler(params: SamplingParams) -> Sampler:
    """A sampler(logits (1, vocab), history (T,)) -> token (1,), with its own random key if seeded."""
    key = mx.random.key(params.seed) if params.seed is not None else None

    def sample(logits: mx.array, history: mx.array) -> mx.array:
        nonlocal key
        if params.repetition_penalty != 1.0 and history.size:
            logits = apply_repetition_penalty(logits, history[-params.repetition_context:],
                                              params.repetition_penalty)
        if params.temperature <= 0:
            return mx.argmax(logits, axis=-1)
        logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
        if key is None:
            return mx.random.categorical(logits)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logits, key=sub)

    return sample


def probabilities(logits: mx.array, history: list[int], params: SamplingParams) -> mx.array:
    """The distribution that make_sampler(params) draws from, logits (1, vocab) -> (1, vocab) float32: the
    repetition penalty over `history`, then one-hot at the argmax when greedy, else the softmax of the filtered
    logits at the temperature. Speculative decoding compares the target's and the draft's (engine/speculative)."""
    logits = logits.astype(mx.float32)
    if params.repetition_penalty != 1.0 and history:
        logits = apply_repetition_penalty(logits, history[-params.repetition_context:], params.repetition_penalty)
    if params.temperature <= 0:
        return (mx.arange(logits.shape[-1]) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
    return mx.softmax(filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p), axis=-1)


def apply_repetition_penalty(logits: mx.array, recent: mx.array | list[int], penalty: float) -> mx.array:
    """CTRL's penalty: a seen token's logit is divided by `penalty` if positive, multiplied if negative.
    recent: token ids (T,), an array (possibly not yet evaluated) or a list; repeats allowed (a repeated id is
    written twice with the same value)."""
    ids = mx.array(recent, dtype=mx.uint32)
    seen = logits[:, ids]
    logits[:, ids] = mx.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(logits: mx.array, top_k: int, top_p: float, min_p: float) -> mx.array:
    """Set to -inf every logit that top-k, top-p (nucleus) or min-p removes. logits: (1, vocab), temperature
    already applied."""
    neg_inf = mx.array(-float("inf"), logits.dtype)
    if 0 < top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = mx.where(logits < kth, neg_inf, logits)
    probs = mx.softmax(logits, axis=-1)
    if 0.0 < top_p < 1.0:
        order = mx.argsort(-probs, axis=-1)
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability mass ranked above each token
        keep_sorted = before < top_p  # keeps the smallest prefix reaching top_p (the crossing token included)
        keep = mx.zeros_like(keep_sorted)
        keep = mx.put_along_axis(keep, order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, neg_inf)
    if min_p > 0.0:
        logits = mx.where(probs < min_p * probs.max(axis=-1, keepdims=True), neg_inf, logits)
    return logits
