"""Token generation: THE decode loop (chunked prefill, then decode with host and device work overlapped).

The loop takes what differs between its users as functions: a forward (one process's model and cache, or one
rank's part of a model split over several processes) and an optional lockstep hook (distributed ranks share the
sampled token and the stop request after every step). This layer knows token ids only; text, chat and thinking
live above it (see api.py / chat.py).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from qwen_mlx.cache.recurrent import settle
from qwen_mlx.engine.step import compiled_forward
from qwen_mlx.models.qwen3 import Cache, Model

# logits (1, vocab) float32, tokens so far (prompt + generated, (T,) uint32, possibly not yet evaluated) -> the
# next token (1,) uint32
Sampler = Callable[[mx.array, mx.array], mx.array]
# tokens (L,) -> float32 logits of the last position (1, vocab); runs the tokens into the forward's cache
Forward = Callable[[mx.array], mx.array]
# tokens (L,) -> the arrays whose evaluation runs them into the cache (a prompt's chunk: no logits needed)
Fill = Callable[[mx.array], list[mx.array]]


def greedy(logits: mx.array, history: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


@dataclass(frozen=True)
class Lockstep:
    """What processes that decode one sequence together add to the loop (distributed.runtime's ranks).

    `share(token, stop)` runs after every step (token None after a prompt chunk): it takes this process's sampled
    token (1,) and whether this process asks to stop, and returns [token, stop] (2,) uint32, the same on every
    process: the sampling process's token and the first process's stop request. Every process builds the same
    steps, so a stop takes effect where all of them read it; by then each has queued one more step (the overlap),
    and `forget(n)` removes the tokens of the n steps run after the stop was asked for from this process's cache.
    """

    share: Callable[[mx.array | None, bool], mx.array]
    forget: Callable[[int], None]


@dataclass
class GenerationStats:
    """Timings of one generation, updated live as tokens arrive."""

    prompt_tokens: int = 0  # tokens actually prefilled (a reused cache prefix is not counted)
    prompt_seconds: float = 0.0
    time_to_first_token: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # from the first generated token to the latest
    peak_memory: int = 0  # bytes, mx.get_peak_memory() since the generation started
    # Speculative decoding (engine/speculative.py): target forward passes, tokens drafted, drafted tokens accepted.
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    _start: float = field(default=0.0, repr=False)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens the target accepted (0 without speculation)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per target forward pass (1 without speculation)."""
        return self.generated_tokens / self.forwards if self.forwards else 1.0

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


def decode_forward(model: Model, cache: list[Cache], *, compiled: bool = True) -> Forward:
    """The decode step's forward: a token (1,) -> its float32 logits (1, vocab), the token run into `cache`. With
    `compiled`, through the compiled step (engine/step.py) wherever it applies; otherwise, and where it does not,
    through the model op by op (logits_last), the reference it is tested against."""
    fast = compiled_forward(model, cache) if compiled else None

    def forward(token: mx.array) -> mx.array:
        logits = fast(token) if fast is not None else None
        return logits if logits is not None else logits_last(model, token, cache)

    return forward


def prefill(model: Model, tokens: mx.array, cache: list[Cache], *, chunk: int = 512,
            stop: threading.Event | None = None) -> bool:
    """Run tokens (L,) into the cache in chunks of `chunk` tokens (bounded activation memory for long prompts).
    Returns False if `stop` was set between chunks."""
    for start in range(0, tokens.size, chunk):
        if stop is not None and stop.is_set():
            return False
        mx.eval(fill(model, tokens[start : start + chunk], cache))
    return True


def fill(model: Model, tokens: mx.array, cache: list[Cache]) -> list[mx.array]:
    """Run tokens (L,) into the cache; returns the caches' arrays to evaluate. Not the output: the last layer's MLP
    and the head are not needed for a prompt's non-final tokens."""
    model.model(tokens[None], cache)
    return [c.state for c in cache]


def generate_tokens(model: Model, prompt: list[int], cache: list[Cache], *, sampler: Sampler = greedy,
                    max_tokens: int = 256, prefill_chunk: int = 512, stats: GenerationStats | None = None,
                    stop: threading.Event | None = None, compiled: bool = True) -> Iterator[int]:
    """Yield up to max_tokens new token ids after `prompt`, which is appended to `cache` (possibly already
    holding earlier tokens: then pass only the tokens it does not hold). The common case of `decode`: one process,
    the whole model, each decode step compiled where it can be (`compiled`; see decode_forward)."""
    try:
        yield from decode(decode_forward(model, cache, compiled=compiled), lambda tokens: fill(model, tokens, cache),
                          prompt, sampler=sampler, max_tokens=max_tokens, prefill_chunk=prefill_chunk, stats=stats,
                          stop=stop)
    finally:
        settle(cache)


def decode(forward: Forward, fill: Fill, prompt: list[int], *, sampler: Sampler = greedy, max_tokens: int = 256,
           prefill_chunk: int = 512, stats: GenerationStats | None = None, stop: threading.Event | None = None,
           lockstep: Lockstep | None = None, eos: Collection[int] = ()) -> Iterator[int]:
    """Yield up to max_tokens new token ids after `prompt`: all but its last token go through `fill` in chunks of
    `prefill_chunk`, then each step runs one token through `forward` and samples the next.

    Overlap: step n + 1 is built from the lazy token n and queued on the device (`mx.async_eval`) before token n
    is read, so building a step's graph overlaps the device's work on the previous one, and the caller's work on
    token n overlaps step n + 1. When the caller stops (`stop` set, or the generator closed) the cache holds the
    prompt and the yielded tokens except possibly the last one: `cache[0].offset` says exactly how many. After a
    token in `eos` the loop ends by itself (processes in lockstep need that; a single caller may just stop).
    """
    if not prompt:
        raise ValueError("decode needs at least one prompt token")
    stats = stats if stats is not None else GenerationStats()
    closing = threading.Event()  # the caller closed the generator: processes in lockstep still run to the stop
    asked = lambda: closing.is_set() or (stop is not None and stop.is_set())
    with mx.stream(generation_stream()):
        steps = _steps(forward, fill, prompt, sampler, max_tokens, prefill_chunk, stats, asked, lockstep, set(eos))
        first = None
        for n, token in enumerate(steps):
            now = time.perf_counter()
            if first is None:
                first = now
                stats.prompt_tokens = len(prompt)
                stats.time_to_first_token = stats.prompt_seconds = now - stats._start
            stats.generated_tokens = n + 1
            stats.decode_seconds = now - first
            stats.peak_memory = mx.get_peak_memory()
            try:
                yield token
            except GeneratorExit:
                closing.set()
                for _ in steps:  # alone: returns at once; in lockstep: the steps every process runs to the stop
                    pass
                raise


def read(y: mx.array) -> list[int]:
    """Wait for a step and read its output: [token] alone, [token, stop] in lockstep."""
    return y.tolist()


def _steps(forward: Forward, fill: Fill, prompt: list[int], sampler: Sampler, max_tokens: int, prefill_chunk: int,
           stats: GenerationStats, asked: Callable[[], bool], lockstep: Lockstep | None,
           eos: set[int]) -> Iterator[int]:
    """The tokens to hand to the caller: each one read whose next step was built before this process asked to stop
    (so the cache holds exactly the tokens handed over, plus the prompt). In lockstep the loop goes on, without
    handing tokens over, until every process reads the stop."""
    stats._start = time.perf_counter()
    mx.reset_peak_memory()
    ids = mx.array(prompt, dtype=mx.uint32)  # (T,)
    for start in range(0, ids.size - 1, prefill_chunk):
        if lockstep is None and asked():
            return
        mx.eval(fill(ids[start : min(start + prefill_chunk, ids.size - 1)]))
        if lockstep is not None and read(lockstep.share(None, asked()))[1]:
            return

    history = ids

    def step(token: mx.array, stopping: bool) -> mx.array:
        """token (1,) -> the next token (1,), or [token, stop] (2,) in lockstep; lazy."""
        y = sampler(forward(token), history)
        return y if lockstep is None else lockstep.share(y, stopping)

    y = step(ids[-1:], asked())
    mx.async_eval(y)
    for n in range(max_tokens):
        stopping = asked()  # as of building step n + 1
        if stopping and lockstep is None:
            return
        queued = None
        if n + 1 < max_tokens:
            token = y[:1]  # (1,), lazy: step n + 1 is built before token n is known
            history = mx.concatenate([history, token])
            queued = step(token, stopping)
            mx.async_eval(queued)
        token_id, *stopped = read(y)
        if stopped and stopped[0]:
            if queued is not None:
                mx.eval(queued)  # every process queued it: run it before leaving
            lockstep.forget(1 if queued is None else 2)  # the tokens y and queued fed
            return
        if not stopping:
            yield token_id
        if token_id in eos:
            if queued is not None:
                mx.eval(queued)
            return
        y = queued
