"""The public Python API: load a model, generate, stream, chat.

    llm = qwen_mlx.load("Qwen/Qwen3-4B")
    reply = llm.generate("Why is the sky blue?", think=False)
    for event in llm.stream([{"role": "user", "content": "hi"}]):
        print(event.kind, event.text)
    chat = llm.chat(system="You are terse.")
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlx.core as mx

from .cache import make_cache
from .generate import GenerationStats, generate_tokens
from .loader import load_model
from .memory import MemoryPlan
from .model import Cache, Model
from .sampling import SamplingParams, make_sampler
from .thinking import ThinkingSplitter, prompt_opens_thinking
from .tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Event:
    """One piece of a streamed reply. kind "thinking"/"answer" carry text; the last event is "done"."""

    kind: Literal["thinking", "answer", "done"]
    text: str
    stats: GenerationStats
    finish_reason: FinishReason | None = None  # set on "done"


@dataclass
class Reply:
    text: str  # the answer
    thinking: str
    stats: GenerationStats
    finish_reason: FinishReason


Prompt = str | list[dict]


class LLM:
    """A loaded model with its tokenizer."""

    def __init__(self, model: Model, tokenizer: Tokenizer, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, path

    @property
    def config(self):
        return self.model.config

    def prompt_tokens(self, prompt: Prompt, *, think: bool = True, system: str | None = None) -> list[int]:
        """The token ids the chat template renders for a message list (a string is one user message); text in
        user, system and tool messages is plain text, never control tokens."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return self.tokenizer.encode_chat(messages, enable_thinking=think)

    def sampling(self, think: bool, **overrides) -> SamplingParams:
        """The checkpoint's recommended sampling for thinking or non-thinking turns, with overrides."""
        return SamplingParams.for_checkpoint(self.path, thinking=think, **overrides)

    def stream(self, prompt: Prompt, *, think: bool = True, system: str | None = None, max_tokens: int = 1024,
               sampling: SamplingParams | None = None, stop: threading.Event | None = None,
               stop_strings: tuple[str, ...] = (), max_kv_size: int | None = None,
               kv_bits: int | None = None, kv_group_size: int | None = None) -> Iterator[Event]:
        """Stream a reply: thinking and answer text as it is decoded, then a "done" event with the stats.
        `max_kv_size` bounds the KV cache (a rotating window), `kv_bits` quantizes it (see cache.make_cache)."""
        tokens = self.prompt_tokens(prompt, think=think, system=system)
        cache = self.new_cache(max_size=max_kv_size, bits=kv_bits, group_size=kv_group_size)
        yield from stream_reply(self, tokens, cache, tokens, sampling or self.sampling(think),
                                max_tokens=max_tokens, stop=stop, stop_strings=stop_strings)

    def new_cache(self, **options) -> list[Cache]:
        """An empty KV cache for this model (options as cache.make_cache: max_size, bits, group_size)."""
        return make_cache(self.config, **options)

    def generate_tokens(self, new_tokens: list[int], cache: list[Cache], sampling: SamplingParams, *,
                        max_tokens: int, stats: GenerationStats, stop: threading.Event | None) -> Iterator[int]:
        """The token ids after `new_tokens` (see generate.generate_tokens); the one step a distributed model
        (distributed.DistributedLLM) does differently."""
        return generate_tokens(self.model, new_tokens, cache, sampler=make_sampler(sampling), max_tokens=max_tokens,
                               stats=stats, stop=stop)

    def generate(self, prompt: Prompt, **kwargs) -> Reply:
        """The whole reply at once; takes the same arguments as `stream`."""
        return collect(self.stream(prompt, **kwargs))

    def chat(self, *, system: str | None = None, think: bool = True, max_kv_size: int | None = None,
             kv_bits: int | None = None, kv_group_size: int | None = None, sampling: SamplingParams | None = None):
        """A multi-turn conversation that keeps its KV cache between turns (see chat.ChatSession)."""
        from .chat import ChatSession

        return ChatSession(self, system=system, think=think, max_kv_size=max_kv_size, kv_bits=kv_bits,
                           kv_group_size=kv_group_size, sampling=sampling)


def load(path_or_repo: str | Path, *, dtype: mx.Dtype | None = None, memory: MemoryPlan | None = None) -> LLM:
    """Load a checkpoint directory or hub id (downloaded once into the Hugging Face cache). With `memory` (the KV
    cache a run will need), a model that would not fit the GPU's recommended working set is refused before any
    weight is read (see memory.py)."""
    model, path = load_model(path_or_repo, dtype=dtype, memory=memory)
    return LLM(model, Tokenizer.from_dir(path), path)


def stream_reply(llm: LLM, prompt: list[int], cache: list[Cache], new_tokens: list[int], sampling: SamplingParams,
                 *, max_tokens: int, stop: threading.Event | None = None, stop_strings: tuple[str, ...] = (),
                 generated: list[int] | None = None) -> Iterator[Event]:
    """Generate after `prompt`, of which `cache` already holds all but `new_tokens`; split the tokens into
    thinking and answer text as they arrive. Generated ids are appended to `generated` when given."""
    tok = llm.tokenizer
    stats = GenerationStats()
    splitter = ThinkingSplitter(tok.think_id, tok.think_end_id, prompt_opens_thinking(prompt, tok.think_id,
                                                                                      tok.think_end_id))
    detok = tok.detokenizer()
    eos = set(tok.eos_ids)
    generated = generated if generated is not None else []
    channel = "thinking" if splitter.in_thinking else "answer"
    answer = ""
    reason: FinishReason = "length"
    for token in llm.generate_tokens(new_tokens, cache, sampling, max_tokens=max_tokens, stats=stats, stop=stop):
        generated.append(token)
        if token in eos:
            reason = "stop"
            break
        kind = splitter.feed(token)
        if kind is None:  # a think marker: finish the text of the channel it closes
            text = detok.flush()
            if text:
                yield Event(channel, text, stats)
            channel = "thinking" if splitter.in_thinking else "answer"
            continue
        text = detok.add(token)
        if not text:
            continue
        if kind == "answer" and stop_strings:
            answer += text
            hit = min((answer.find(s) for s in stop_strings if s in answer), default=-1)
            if hit >= 0:
                text = text[: max(0, len(text) - (len(answer) - hit))]
                if text:
                    yield Event(kind, text, stats)
                reason = "stop"
                break
        yield Event(kind, text, stats)
    else:
        if stop is not None and stop.is_set():
            reason = "cancelled"
    text = detok.flush()
    if text and reason != "stop":
        yield Event(channel, text, stats)
    yield Event("done", "", stats, reason)


def collect(events: Iterator[Event]) -> Reply:
    answer, thinking = [], []
    for event in events:
        if event.kind == "answer":
            answer.append(event.text)
        elif event.kind == "thinking":
            thinking.append(event.text)
        else:
            return Reply("".join(answer), "".join(thinking), event.stats, event.finish_reason)
    raise RuntimeError("the event stream ended without a 'done' event")
