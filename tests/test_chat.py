"""The public API end to end on a tiny checkpoint: streaming events, chat sessions reusing their cache."""

import threading
import time

import pytest

import qwen_mlx
from qwen_mlx.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return qwen_mlx.load(tiny_checkpoint("qwen3"))


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


def test_stop_during_prefill_returns_within_a_second_and_the_session_stays_consistent(llm):
    chat = llm.chat(think=False, sampling=GREEDY)
    stop = threading.Event()
    long_text = " ".join(f"word{i}" for i in range(700))  # ~2k tokens: several prefill chunks
    events, stopped_at = [], []

    def stopper():
        stop.wait(0.05) or stop.set()
        stopped_at.append(time.perf_counter())

    threading.Thread(target=stopper).start()
    for event in chat.send(long_text, max_tokens=5, stop=stop):
        events.append(event)
    done_at = time.perf_counter()
    assert events[-1].kind == "done" and events[-1].finish_reason == "cancelled"
    assert done_at - stopped_at[0] < 1.0
    assert 0 < chat.cache[0].offset < len(llm.prompt_tokens(chat.messages[:1], think=False))
    nxt = "".join(e.text for e in chat.send("short", max_tokens=5))
    fresh = llm.chat(think=False, sampling=GREEDY)
    fresh.messages = [dict(m) for m in chat.messages[:-2]]
    assert "".join(e.text for e in fresh.send("short", max_tokens=5)) == nxt


@pytest.mark.parametrize("kv_bits", [None, 8])
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
