"""Reference decoders shared by the parity tests (ours, transformers' and mlx-lm's, all greedy), and the slow
marker for the cases of a parametrized test that the default run leaves to CI."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx.cache.kv import make_cache


def greedy_ours(model, prompt: np.ndarray, n: int, cache=None) -> list[int]:
    """Prefill the prompt, then decode one token at a time through the KV cache."""
    cache = cache if cache is not None else make_cache(model.config)
    logits = model(mx.array(prompt)[None], cache)
    out = []
    for _ in range(n):
        token = mx.argmax(logits[:, -1], axis=-1)
        out.append(token.item())
        logits = model(token[:, None], cache)
    return out


def greedy_transformers(hf_model, prompt: np.ndarray, n: int) -> list[int]:
    """transformers' own KV-cached greedy decode, without stopping at eos."""
    import torch

    out = hf_model.generate(torch.tensor(prompt)[None], max_new_tokens=n, do_sample=False, eos_token_id=[],
                            pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy_mlx_lm(path, prompt: np.ndarray, n: int) -> list[int]:
    from mlx_lm.utils import load_model

    return greedy_mlx_lm_model(load_model(path)[0], prompt, n)


def greedy_mlx_lm_model(model, prompt: np.ndarray, n: int) -> list[int]:
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    return [int(token) for token, _ in steps]


def common_prefix(a, b) -> int:
    """How many leading tokens two id sequences share: the oracle for a chat's prefill counts, written apart from
    cache.prefix.common_prefix on purpose (the session under test uses that one)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def greedy_with_logits(model, prompt, n, caches) -> tuple[list[int], np.ndarray]:
    """greedy_ours through the given caches, also returning the float32 logits each token was chosen from (n, V)."""
    logits = model(mx.array(prompt)[None], caches)
    tokens, rows = [], []
    for _ in range(n):
        rows.append(np.array(logits[0, -1].astype(mx.float32)))
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[:, None], caches)
    return tokens, np.stack(rows)


def prefill(model, caches, ids, chunks) -> None:
    """Run ids through the model (without its head) in steps of the given lengths, filling the caches."""
    assert sum(chunks) == len(ids)
    a = 0
    for n in chunks:
        mx.eval(model.model(mx.array(ids[a : a + n])[None], caches))
        a += n


def prompt_ids(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 151643, n)


def joined_gate_up(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint-layout weights (the experts' gate and up stacks apart) in our model's layout: each layer's gate
    and up concatenated along the output rows into one gate_up_proj stack, gate first."""
    out = dict(weights)
    for name in [n for n in weights if ".switch_mlp.gate_proj." in n]:
        up = name.replace(".gate_proj.", ".up_proj.")
        out[name.replace(".gate_proj.", ".gate_up_proj.")] = mx.concatenate([out.pop(name), out.pop(up)], axis=-2)
    return out


def slow_except(cases: list, *default) -> list:
    """`cases` for parametrize, each not in `default` marked slow: the default run keeps those, CI runs all."""
    return [case if case in default else pytest.param(*(case if isinstance(case, tuple) else (case,)),
                                                      marks=pytest.mark.slow) for case in cases]
