"""Token generation: chunked prefill, then a decode loop that overlaps host and device work.

This layer knows token ids only; text, chat and thinking live above it (see api.py / chat.py).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from qwen_mlx.cache.recurrent import snapshot_positions
from qwen_mlx.models.qwen3 import Cache, Model

# logits (1, vocab) float32, tokens so far (prompt + generated) -> next token (1,)
Sampler = Callable[[mx.array, list[int]], mx.array]


def greedy(logits: mx.array, history: list[int]) -> mx.array:
    return mx.argmax(logits, axis=-1)


@dataclass
class GenerationStats:
    """Timings of one generation, updated live as tokens arrive."""

    prompt_tokens: int = 0  # tokens actually prefilled (a reused cache prefix is not counted)
    prompt_seconds: float = 0.0
    time_to_first_token: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # from the first generated token to the latest
    peak_memory: int = 0  # bytes, mx.get_peak_memory() since the generation started
    _start: float = field(default=0.0, repr=False)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first token (the first one's time is prefill's)."""
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0


@functools.cache
def generation_stream() -> mx.Stream:
    """The stream generation runs on: thread-local, so the TUI's worker thread (or any thread) can generate."""
    return mx.new_thread_local_stream(mx.default_device())


def logits_last(model: Model, tokens: mx.array, cache: list[Cache]) -> mx.array:
    """Run tokens (L,) through the model and return the float32 logits of the last position only, (1, vocab):
    the LM head, the largest matmul, is not computed for the other positions."""
    h = model.model(tokens[None], cache)
    return model.head(h[:, -1:, :])[:, -1, :].astype(mx.float32)


def prefill(model: Model, tokens: mx.array, cache: list[Cache], *, chunk: int = 512,
            stop: threading.Event | None = None) -> bool:
    """Run tokens (L,) into the cache in chunks of `chunk` tokens (bounded activation memory for long prompts).
    A chunk also ends where a recurrent cache wants a snapshot (cache.recurrent). Returns False if `stop` was set
    between chunks."""
    held = cache[0].offset
    cuts = {p - held for p in snapshot_positions(cache) if 0 < p - held < tokens.size}
    bounds = sorted({*range(0, tokens.size, chunk), *cuts, tokens.size})
    for start, end in zip(bounds, bounds[1:]):
        if stop is not None and stop.is_set():
            return False
        model.model(tokens[None, start:end], cache)
        # Evaluate the caches, not the output: the last layer's MLP is not needed for a prompt's non-final tokens.
        mx.eval([c.state for c in cache])
    return True


def generate_tokens(model: Model, prompt: list[int], cache: list[Cache], *, sampler: Sampler = greedy,
                    max_tokens: int = 256, prefill_chunk: int = 512, stats: GenerationStats | None = None,
                    stop: threading.Event | None = None) -> Iterator[int]:
    """Yield up to max_tokens new token ids after `prompt`, which is appended to `cache` (possibly already
    holding earlier tokens: then pass only the tokens it does not hold).

    The next step is queued on the device (`mx.async_eval`) before the current token is handed to the caller, so
    the caller's work per token overlaps the model's. When the caller stops, the cache holds the prompt and the
    yielded tokens except possibly the last one: `cache[0].offset` says exactly how many tokens it holds.
    """
    if not prompt:
        raise ValueError("generate_tokens needs at least one prompt token")
    with mx.stream(generation_stream()):
        yield from _generate(model, prompt, cache, sampler, max_tokens, prefill_chunk,
                             stats if stats is not None else GenerationStats(), stop)


def _generate(model: Model, prompt: list[int], cache: list[Cache], sampler: Sampler, max_tokens: int,
              prefill_chunk: int, stats: GenerationStats, stop: threading.Event | None) -> Iterator[int]:
    stats._start = time.perf_counter()
    mx.reset_peak_memory()
    history = list(prompt)
    tokens = mx.array(prompt, dtype=mx.uint32)

    if not prefill(model, tokens[:-1], cache, chunk=prefill_chunk, stop=stop):
        return

    def step(last: mx.array) -> mx.array:
        return sampler(logits_last(model, last, cache), history)

    y = step(tokens[-1:])
    mx.async_eval(y)
    first = None
    for n in range(max_tokens):
        if stop is not None and stop.is_set():
            return
        token = y.item()  # waits for this step; the next one is already queued below
        now = time.perf_counter()
        if first is None:
            first = now
            stats.prompt_tokens = len(prompt)
            stats.time_to_first_token = stats.prompt_seconds = now - stats._start
        history.append(token)
        if n + 1 < max_tokens:
            y = step(y)
            mx.async_eval(y)
        stats.generated_tokens = n + 1
        stats.decode_seconds = now - first
        stats.peak_memory = mx.get_peak_memory()
        yield token
