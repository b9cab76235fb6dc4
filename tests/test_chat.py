"""The public API end to end on a tiny checkpoint: streaming events, chat sessions reusing their cache."""

import threading
import time

import pytest
from helpers import common_prefix

import qwen_mlx
from qwen_mlx.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return qwen_mlx.load(tiny_checkpoint("qwen3"))


def test_stream_events_then_done(llm):
    events = list(llm.stream("hello", max_tokens=10, sampling=GREEDY))
    assert events[-1].kind == "done" and events[-1].finish_reason == "length"
    assert {e.kind for e in events[:-1]} <= {"answer", "thinking"}
    reply = llm.generate("hello", max_tokens=10, sampling=GREEDY)
    assert reply.text + reply.thinking == "".join(e.text for e in events[:-1])
    assert reply.stats.generated_tokens == 10 and reply.stats.prompt_tokens == len(llm.prompt_tokens("hello"))


def test_turn_two_prefills_only_what_changed_and_equals_a_fresh_session(llm):
    chat = llm.chat(system="Be brief.", think=False, sampling=GREEDY)
    list(chat.send("first question", max_tokens=8))
    turn1 = chat.last_prefill
    held = chat._cached
    assert turn1 == len(llm.prompt_tokens(chat.messages[:2], think=False))  # all of it, the first time
    reply2 = "".join(e.text for e in chat.send("second question", max_tokens=8))
    prompt2 = llm.prompt_tokens(chat.messages[:-1], think=False)
    assert chat.last_prefill == len(prompt2) - common_prefix(held, prompt2)
    # reused: everything up to turn 1's answer header (the template re-renders that answer without its empty
    # <think>\n\n</think>\n\n block, 4 tokens)
    assert common_prefix(held, prompt2) >= turn1 - 4
    # a fresh session given the same history says the same
    fresh = llm.chat(think=False, sampling=GREEDY)
    fresh.messages = [dict(m) for m in chat.messages[:-2]]
    assert "".join(e.text for e in fresh.send("second question", max_tokens=8)) == reply2
    assert fresh.last_prefill == len(prompt2)


def test_cancel_keeps_the_partial_answer_and_the_next_turn_is_consistent(llm):
    stop = threading.Event()
    chat = llm.chat(think=False, sampling=GREEDY)
    seen = []
    for event in chat.send("tell me a story", max_tokens=50, stop=stop):
        seen.append(event)
        if len(seen) == 3:
            stop.set()
    assert seen[-1].kind == "done" and seen[-1].finish_reason == "cancelled"
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.messages[-1]["content"] == "".join(e.text for e in seen if e.kind == "answer")
    nxt = "".join(e.text for e in chat.send("go on", max_tokens=6))
    fresh = llm.chat(think=False, sampling=GREEDY)
    fresh.messages = [dict(m) for m in chat.messages[:-2]]
    assert "".join(e.text for e in fresh.send("go on", max_tokens=6)) == nxt


def test_stop_strings_cut_the_answer(llm):
    full = llm.generate("hello", max_tokens=12, sampling=GREEDY, think=False).text
    assert len(full) > 6
    stop_at = full[3:6]
    cut = llm.generate("hello", max_tokens=12, sampling=GREEDY, think=False, stop_strings=(stop_at,))
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop_at)]


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_stop_returns_within_a_second_and_the_next_turn_equals_a_fresh_session(llm, when):
    """Esc as the chat app does it: the reply streams on a worker thread and the UI thread sets the stop event,
    here during the prompt's prefill or after a few decoded tokens. The worker is done within a second; the next
    turn, greedy, says exactly what a fresh session says given the same history (the cut-off reply as kept)."""
    chat = llm.chat(think=False, sampling=GREEDY)
    text = " ".join(f"word{i}" for i in range(300)) if when == "prefill" else "tell me a story"  # ~1.1k tokens: 3 chunks
    prompt_length = len(llm.prompt_tokens([{"role": "user", "content": text}], think=False))
    stop, events = threading.Event(), []

    def worker():
        for event in chat.send(text, max_tokens=500, stop=stop):
            events.append(event)

    thread = threading.Thread(target=worker)
    thread.start()
    deadline = time.monotonic() + 60
    while (chat.cache[0].offset == 0 if when == "prefill" else len(events) < 3) and time.monotonic() < deadline:
        time.sleep(0.001)
    stop.set()
    stopped = time.perf_counter()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.perf_counter() - stopped < 1.0

    assert events[-1].kind == "done" and events[-1].finish_reason == "cancelled"
    generated = events[-1].stats.generated_tokens
    if when == "prefill":
        assert 0 < chat.cache[0].offset < prompt_length and generated == 0
    else:
        assert 3 <= generated < 500
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(e.text for e in events[:-1])}

    nxt = "".join(e.text for e in chat.send("go on", max_tokens=8))
    fresh = llm.chat(think=False, sampling=GREEDY)
    fresh.messages = [dict(m) for m in chat.messages[:-2]]
    assert "".join(e.text for e in fresh.send("go on", max_tokens=8)) == nxt
    assert fresh._cached == chat._cached  # the same prompt and the same greedy tokens, id for id
    assert fresh.last_prefill > chat.last_prefill  # and the stopped session did reuse its cache


@pytest.mark.parametrize("kv_bits", [None, pytest.param(8, marks=pytest.mark.slow)])  # 6 s each
def test_fifty_turns_overflowing_a_rotating_window_keep_memory_flat(llm, kv_bits):
    import mlx.core as mx

    chat = llm.chat(think=False, sampling=GREEDY, max_kv_size=96, kv_bits=kv_bits)
    sizes, peaks = [], []
    for turn in range(50):
        mx.reset_peak_memory()
        list(chat.send(f"turn {turn}: tell me more", max_tokens=4))
        sizes.append(sum(c.nbytes for c in chat.cache))
        peaks.append(mx.get_peak_memory())
    assert chat.cache[0].offset > 96 * 3  # the window overflowed many times over
    assert max(sizes[10:]) == min(sizes[10:])  # the cache's memory is fixed once full
    assert max(peaks[10:]) <= 1.05 * min(peaks[10:])
    print(f"kv_bits={kv_bits}: cache {sizes[-1]} bytes, peak {max(peaks[10:]) / 2**20:.1f} MiB over turns 10-50")
