"""Continuous batching under load, the prefix cache across requests, and cancellation on disconnect."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import openai
import pytest
from serve_fixtures import running

import qwen_mlx
from qwen_mlx.engine.batch import decode_logits
from qwen_mlx.engine.generate import prefill
from qwen_mlx.engine.sampling import SamplingParams
from qwen_mlx.serve.app import ServeOptions, create_app


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return qwen_mlx.load(tiny_checkpoint("qwen3"))


def test_batched_decode_equals_each_sequence_alone(llm):
    """Sequences of different lengths (one with a quantized cache) in one step give the tokens each gives alone."""
    prompts, kinds = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(100, 140))], [{}, {"bits": 8}, {}]

    def start(prompt, options):
        cache = llm.new_cache(**options)
        prefill(llm.model, mx.array(prompt[:-1]), cache)
        return cache

    alone = []
    for prompt, options in zip(prompts, kinds):
        cache, last, out = start(prompt, options), prompt[-1], []
        for _ in range(6):
            last = mx.argmax(decode_logits(llm.model, [last], [cache]), axis=-1).item()
            out.append(last)
        alone.append(out)
    caches = [start(p, o) for p, o in zip(prompts, kinds)]
    last, together = [p[-1] for p in prompts], [[] for _ in prompts]
    for _ in range(6):
        last = mx.argmax(decode_logits(llm.model, last, caches), axis=-1).tolist()
        for out, token in zip(together, last):
            out.append(token)
    assert together == alone


@pytest.mark.slow
def test_32_streaming_clients_each_get_their_greedy_answer(llm):
    questions = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(32)]
    expected = [llm.generate(q, sampling=SamplingParams(temperature=0.0), max_tokens=8, think=False).text
                for q in questions]
    app = create_app(llm, ServeOptions("tiny", max_batch=8, max_queue=32))
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(question):
            stream = client.chat.completions.create(model="tiny", messages=question, temperature=0, max_tokens=8,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].usage.completion_tokens

        ask(questions[0])  # warm up, then measure memory
        app.state.scheduler.prefix.clear()
        mx.clear_cache()
        start = mx.get_active_memory()
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(ask, questions))
        assert [text for text, _ in results] == expected
        assert [n for _, n in results] == [8] * 32
        assert app.state.scheduler.busy == 0
        app.state.scheduler.prefix.clear()
        mx.clear_cache()
        assert mx.get_active_memory() <= start + 64 * 1024


def test_second_request_sharing_a_long_system_prompt_prefills_only_its_new_tokens(llm):
    system = " ".join(f"Rule {i}: answer politely and briefly." for i in range(150))
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of France?"}]
    p1, p2 = llm.prompt_tokens(first), llm.prompt_tokens(second)
    shared = next(i for i, (a, b) in enumerate(zip(p1, p2)) if a != b)
    assert shared >= 1000
    expected = llm.generate(second, sampling=SamplingParams(temperature=0.0), max_tokens=6).text
    app = create_app(llm, ServeOptions("tiny"))
    scheduler = app.state.scheduler
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        client.chat.completions.create(model="tiny", messages=first, temperature=0, max_tokens=2)
        assert scheduler.prefilled_tokens == len(p1) - 1  # the last prompt token goes through the decode step
        reply = client.chat.completions.create(model="tiny", messages=second, temperature=0, max_tokens=6)
        assert scheduler.prefilled_tokens - (len(p1) - 1) == len(p2) - 1 - shared
        assert reply.usage.prompt_tokens_details.cached_tokens == shared
        assert reply.choices[0].message.content == expected  # the reused cache is the same as a fresh one


class StopRecorder(threading.Event):
    """A sequence's stop flag that remembers at which scheduler step it was set."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler, self.step = scheduler, None

    def set(self):
        if self.step is None:
            self.step = self.scheduler.steps
        super().set()


def test_a_client_that_disconnects_stops_its_generation_within_one_step(llm):
    app = create_app(llm, ServeOptions("tiny"))
    scheduler, seen = app.state.scheduler, []
    submit = scheduler.submit

    def recording_submit(seq):
        seq.stop = StopRecorder(scheduler)
        seen.append(seq)
        return submit(seq)

    scheduler.submit = recording_submit
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 3000,
            "stream": True, "temperature": 0}
    with running(app) as url:
        with httpx.Client() as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(5)) if line.startswith("data:")]
            assert received
        [seq] = seen
        deadline = threading.Event()
        for _ in range(200):
            if seq.finish is not None:
                break
            deadline.wait(0.05)
        assert seq.finish == "cancelled"
        assert seq.stop.step is not None and seq.stopped_step - seq.stop.step <= 1
        assert len(seq.generated) < 3000 and scheduler.busy == 0


def test_a_client_that_disconnects_before_a_plain_reply_stops_it_too(llm):
    app = create_app(llm, ServeOptions("tiny"))
    scheduler, seen = app.state.scheduler, []
    submit = scheduler.submit
    scheduler.submit = lambda seq: (seen.append(seq), submit(seq))[1]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 3000,
            "temperature": 0}
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)  # gives up and closes
        [seq] = seen
        for _ in range(200):
            if seq.finish is not None:
                break
            threading.Event().wait(0.05)
        assert seq.finish == "cancelled" and len(seq.generated) < 3000
