import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import greedy_ours, prompt_ids

from qwen_mlx.cache.kv import make_cache
from qwen_mlx.engine import generate
from qwen_mlx.engine.generate import GenerationStats, generate_tokens
from qwen_mlx.engine.sampling import SamplingParams, make_sampler
from qwen_mlx.weights.loader import load_model


def test_generate_tokens_equals_reference_greedy(tiny_checkpoint):
    """Chunked prefill + pipelined decode give the plain loop's tokens; stats count what happened."""
    model, _ = load_model(tiny_checkpoint("qwen3"))
    prompt = prompt_ids(40, seed=5).tolist()
    expected = greedy_ours(model, prompt_ids(40, seed=5), 20)
    stats = GenerationStats()
    cache = make_cache(model.config)
    got = list(generate_tokens(model, prompt, cache, max_tokens=20, prefill_chunk=16, stats=stats))
    assert got == expected
    assert (stats.prompt_tokens, stats.generated_tokens) == (40, 20)
    assert stats.decode_tps > 0 and stats.prompt_tps > 0 and stats.peak_memory > 0
    assert cache[0].offset == 40 + 19  # the last token was never fed back


def test_cache_offset_tells_what_is_held_after_an_early_stop(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen2"))
    prompt = prompt_ids(10, seed=6).tolist()
    cache = make_cache(model.config)
    out = []
    for token in generate_tokens(model, prompt, cache, max_tokens=50):
        out.append(token)
        if len(out) == 5:
            break
    assert cache[0].offset == 15  # the 5th token was already fed to the queued step
    # continuing on that cache with new tokens equals a fresh run over the whole history
    more = [100, 200]
    cont = list(generate_tokens(model, more, cache, max_tokens=6))
    fresh = list(generate_tokens(model, prompt + out + more, make_cache(model.config), max_tokens=6))
    assert cont == fresh


def test_stop_event_ends_generation(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen3"))
    stop = threading.Event()
    got = []
    for token in generate_tokens(model, [1, 2, 3], make_cache(model.config), max_tokens=100, stop=stop):
        got.append(token)
        if len(got) == 3:
            stop.set()
    assert len(got) == 3
    stop2 = threading.Event()
    stop2.set()
    assert list(generate_tokens(model, list(range(100)), make_cache(model.config), stop=stop2)) == []


def counting_forward(vocab: int, log: list[str]):
    """A stand-in model: token t -> logits peaked at t + 1 (greedy counts up), logging each call."""
    def forward(tokens: mx.array) -> mx.array:
        log.append("forward")
        return (mx.arange(vocab)[None] == (tokens[-1:] + 1) % vocab).astype(mx.float32)  # (1, vocab)

    return forward


def test_step_n_plus_1_is_built_before_token_n_is_read(monkeypatch):
    """The overlap: each step's graph is built and queued from the lazy token before that token is waited for,
    and the sampler of step n + 1 sees token n in its history."""
    log, histories = [], []
    monkeypatch.setattr(generate, "read", lambda y: log.append("read") or y.tolist())

    def sampler(logits, history):
        histories.append(history)
        return mx.argmax(logits, axis=-1)

    got = list(generate.decode(counting_forward(50, log), lambda tokens: [], [3, 4, 7], sampler=sampler,
                               max_tokens=4))
    assert got == [8, 9, 10, 11]
    assert log == ["forward", "forward", "read", "forward", "read", "forward", "read", "read"]
    assert [h.tolist() for h in histories] == [[3, 4, 7], [3, 4, 7, 8], [3, 4, 7, 8, 9], [3, 4, 7, 8, 9, 10]]


def test_repetition_penalty_through_the_loop_equals_a_plain_loop(tiny_checkpoint):
    """With the overlap the penalty still sees every token up to the one just sampled: the loop's tokens equal a
    plain loop that waits for each token and applies the penalty in NumPy. A penalty below 1 favours seen tokens, so
    that each step depends on the token just before it (a random tiny model hardly repeats itself otherwise)."""
    model, _ = load_model(tiny_checkpoint("qwen3"))
    prompt = prompt_ids(6, seed=9).tolist()
    params = SamplingParams(temperature=0.0, repetition_penalty=0.2, repetition_context=8)
    got = list(generate_tokens(model, prompt, make_cache(model.config), sampler=make_sampler(params),
                               max_tokens=16))
    cache, history, expected = make_cache(model.config), list(prompt), []
    logits = model(mx.array(prompt)[None], cache)[0, -1]
    for _ in range(16):
        x = np.array(logits.astype(mx.float32))
        for t in set(history[-8:]):
            x[t] = x[t] / 0.2 if x[t] > 0 else x[t] * 0.2
        token = int(x.argmax())
        expected.append(token)
        history.append(token)
        logits = model(mx.array([[token]]), cache)[0, -1]
    assert got == expected
    plain = list(generate_tokens(model, prompt, make_cache(model.config), max_tokens=16))
    assert plain != got and len(set(got)) < len(got)  # the penalty acts, on generated tokens too


def test_one_decode_loop():
    """`mx.async_eval` (the overlap) appears in one module of the package only: the engine's loop."""
    root = Path(generate.__file__).resolve().parents[2]
    users = {p.relative_to(root).as_posix() for p in [*root.glob("qwen_mlx/**/*.py"), *root.glob("tui/**/*.py")]
             if "async_eval(" in p.read_text()}
    assert users == {"qwen_mlx/engine/generate.py"}


def recording(log: list[str], fed: list[int]):
    """A counting forward and fill that record every token run into the (pretend) cache."""
    forward = counting_forward(50, log)

    def run(tokens: mx.array) -> mx.array:
        fed.extend(tokens.tolist())
        return forward(tokens)

    return run, lambda tokens: fed.extend(tokens.tolist()) or []


def alone_lockstep(fed: list[int]) -> generate.Lockstep:
    """One process in lockstep with itself: the share hands back its own token and stop request."""
    def share(token, stop):
        mine = token.astype(mx.uint32) if token is not None else mx.zeros((1,), mx.uint32)
        return mx.concatenate([mine, mx.array([stop], mx.uint32)])

    return generate.Lockstep(share, lambda n: fed.__delitem__(slice(len(fed) - n, None)))


@pytest.mark.parametrize("how", ["stop event", "closed"])
@pytest.mark.parametrize("lockstep", [False, True], ids=["alone", "lockstep"])
def test_a_stop_leaves_the_cache_holding_the_prompt_and_the_tokens_handed_over(how, lockstep):
    """Stopped after 3 tokens (Esc, or the caller closing the generator as at a stop string), alone or in lockstep
    (where the stop reaches the others steps later and the extra steps are forgotten): the same 3 tokens, and the
    cache holds the prompt and exactly those tokens."""
    fed, stop = [], threading.Event()
    forward, fill = recording([], fed)
    steps = generate.decode(forward, fill, [3, 4, 7], max_tokens=20, stop=stop,
                            lockstep=alone_lockstep(fed) if lockstep else None)
    got = []
    for token in steps:
        got.append(token)
        if len(got) == 3:
            if how == "closed":
                steps.close()
                break
            stop.set()
    assert got == [8, 9, 10]
    assert fed == [3, 4, 7, 8, 9, 10]
