"""Continuous batching: the requests in flight decode together, one batched forward per step.

One thread owns the model. Each step it (1) drops the sequences whose client left or whose reply is complete,
(2) admits a waiting request when there is room (its prompt starts from the longest prefix the prefix cache
holds), (3) runs one chunk of the prefill of the one sequence being prefilled, and (4) decodes one token for every
sequence in the batch (engine.batch.decode_logits), sampling each row with that sequence's own sampler and
constraint. A request's tokens reach its handler through a queue; its text is made by engine.stream.stream_reply
in the handler's thread (see `Submitted`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx

from qwen_mlx.cache.prefix import PrefixCache
from qwen_mlx.engine.batch import decode_logits
from qwen_mlx.engine.generate import GenerationStats, Sampler, generation_stream, prefill
from qwen_mlx.engine.tokenizer import Tokenizer


class QueueFull(Exception):
    """More requests wait than the server's queue holds."""


class Constraint(Protocol):
    """A logits processor that follows the tokens it lets through (a grammar: see structured.py)."""

    def mask(self, logits: mx.array) -> mx.array: ...  # (1, vocab) -> (1, vocab), forbidden tokens at -inf

    def accept(self, token: int) -> None: ...


class Forward(Protocol):
    """What the scheduler runs: a model's prefill and batched decode (ModelForward), or a test's fake."""

    def new_cache(self) -> list: ...

    def prefill(self, tokens: list[int], cache: list) -> None: ...

    def decode(self, tokens: list[int], caches: list[list]) -> mx.array: ...  # -> logits (B, vocab) float32


class ModelForward:
    def __init__(self, llm, chunk: int = 512):
        self.llm, self.chunk = llm, chunk

    def new_cache(self) -> list:
        return self.llm.new_cache()

    def prefill(self, tokens: list[int], cache: list) -> None:
        prefill(self.llm.model, mx.array(tokens, dtype=mx.uint32), cache, chunk=self.chunk)

    def decode(self, tokens: list[int], caches: list[list]) -> mx.array:
        return decode_logits(self.llm.model, tokens, caches)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens of that step, most likely first


@dataclass(eq=False)
class Sequence:
    """One request in the scheduler. `out` receives (token, TokenLogprob | None) per step, then None."""

    prompt: list[int]
    sampler: Sampler
    max_tokens: int
    constraint: Constraint | None = None
    top_logprobs: int | None = None  # report the chosen token's logprob and this many alternatives
    stop: threading.Event = field(default_factory=threading.Event)  # set by the handler: the client left
    out: queue.Queue = field(default_factory=queue.Queue)
    stats: GenerationStats = field(default_factory=GenerationStats)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    generated: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (eos), "length", "cancelled", "error"
    stopped_step: int | None = None  # the scheduler step at which it noticed `stop`
    cache: list | None = None
    _todo: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    _last: int = 0
    _first: float = 0.0  # when the first token was sampled
    _history: mx.array | None = None  # prompt and generated ids (T,) uint32, what the sampler is given


class Scheduler:
    def __init__(self, forward: Forward, tokenizer: Tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 prefix_cache_bytes: int = 1 << 30, prefill_chunk: int = 512):
        self.forward, self.eos = forward, set(tokenizer.eos_ids)
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, prefill_chunk
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.steps = 0  # decode steps run
        self.prefilled_tokens = 0  # tokens run through prefill, all requests together
        self._waiting: deque[Sequence] = deque()
        self._prefilling: Sequence | None = None
        self._active: list[Sequence] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwen-mlx-scheduler", daemon=True)
        self.on_error = None  # callable(exception), to log a failed step

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> Sequence:
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            seq.stats._start = time.perf_counter()
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    @property
    def busy(self) -> int:
        """Sequences waiting, prefilling or decoding."""
        with self._wake:
            return len(self._waiting) + len(self._active) + (self._prefilling is not None)

    # ------------------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # MLX (0.32) leaves each thread to free its streams and compile cache: left to the thread's exit, that
            # teardown takes the GIL and aborts the process when it races Python's own shutdown (a script that
            # closes its scheduler and ends at once: exit status 134 in most runs).
            mx.clear_streams()

    def _loop(self) -> None:
        with mx.stream(generation_stream()):
            while True:
                try:
                    if not self._next_work():
                        return
                    self._step()
                except Exception as e:  # a failed step ends the sequences in it, never the server
                    for seq in [*self._active, *filter(None, [self._prefilling])]:
                        self._end(seq, "error")
                    self._active, self._prefilling = [], None
                    if self.on_error is not None:
                        self.on_error(e)

    def _next_work(self) -> bool:
        """Wait until there is something to do; False once closed."""
        with self._wake:
            while not self._closed and not (self._waiting or self._active or self._prefilling):
                self._wake.wait()
            if self._closed:
                for seq in [*self._waiting, *self._active, *filter(None, [self._prefilling])]:
                    self._end(seq, "cancelled")
                return False
            # Requests whose client left before their turn end here; the others are admitted when there is room.
            for seq in [s for s in self._waiting if s.stop.is_set()]:
                self._waiting.remove(seq)
                self._end(seq, "cancelled")
            if self._prefilling is None and self._waiting and len(self._active) < self.max_batch:
                self._prefilling = self._waiting.popleft()  # first: a failure to admit it then ends it
                self._admit(self._prefilling)
        return True

    def _admit(self, seq: Sequence) -> None:
        n, cache = self.prefix.lookup(seq.prompt[:-1])
        seq.cache = cache if cache is not None else self.forward.new_cache()
        seq.cached_tokens = n
        seq._todo, seq._last = seq.prompt[n:-1], seq.prompt[-1]
        seq._history = mx.array(seq.prompt, dtype=mx.uint32)

    def _step(self) -> None:
        for seq in [s for s in self._active if s.stop.is_set()]:
            self._active.remove(seq)
            seq.stopped_step = self.steps
            self._end(seq, "cancelled")
        seq = self._prefilling
        if seq is not None and seq.stop.is_set():
            self._prefilling = None
            self._end(seq, "cancelled")
        elif seq is not None:
            chunk, seq._todo = seq._todo[: self.chunk], seq._todo[self.chunk :]
            if chunk:
                self.forward.prefill(chunk, seq.cache)
                self.prefilled_tokens += len(chunk)
                seq.stats.prompt_tokens += len(chunk)
            if not seq._todo:
                self.prefix.store(seq.prompt[:-1], seq.cache)
                self._prefilling = None
                self._active.append(seq)
        if self._active:
            self._decode(list(self._active))  # a copy: sequences that finish leave self._active

    def _decode(self, batch: list[Sequence]) -> None:
        logits = self.forward.decode([s._last for s in batch], [s.cache for s in batch])  # (B, vocab)
        picks, reports = [], []
        for b, seq in enumerate(batch):
            row = logits[b : b + 1]
            if seq.constraint is not None:
                row = seq.constraint.mask(row)
            token = seq.sampler(row, seq._history)
            seq._history = mx.concatenate([seq._history, token])  # lazy, as generate.decode keeps it
            picks.append(token)
            reports.append(_logprobs(row, token, seq.top_logprobs) if seq.top_logprobs is not None else None)
        tokens = mx.concatenate(picks)
        mx.eval(tokens, [r for r in reports if r is not None], [s._history for s in batch])
        self.steps += 1
        now = time.perf_counter()
        for seq, token, report in zip(batch, tokens.tolist(), reports):
            self._emit(seq, token, report, now)

    def _emit(self, seq: Sequence, token: int, report, now: float) -> None:
        stats = seq.stats
        if not seq.generated:
            stats.time_to_first_token = stats.prompt_seconds = now - stats._start
            seq._first = now
        seq.generated.append(token)
        seq._last = token
        stats.generated_tokens = len(seq.generated)
        stats.decode_seconds = now - seq._first
        if seq.constraint is not None:
            seq.constraint.accept(token)
        seq.out.put((token, _report(token, report) if report is not None else None))
        finish = "stop" if token in self.eos else "length" if len(seq.generated) >= seq.max_tokens else None
        if finish is not None:
            self._active.remove(seq)
            if finish == "stop":  # the cache now holds the prompt and the reply but for the eos: a next turn's prefix
                self.prefix.store(seq.prompt + seq.generated[:-1], seq.cache)
            self._end(seq, finish)

    def _end(self, seq: Sequence, finish: str) -> None:
        seq.finish = finish
        seq.cache = None
        seq.out.put(None)


def _logprobs(row: mx.array, token: mx.array, n: int) -> tuple[mx.array, mx.array, mx.array]:
    """The chosen token's log-probability and the n most likely tokens with theirs (most likely first), from the
    logits row (1, vocab) the token was sampled from."""
    lp = row[0] - mx.logsumexp(row[0])
    top = mx.argpartition(-lp, kth=n - 1)[:n] if n else mx.array([], dtype=mx.uint32)
    top = top[mx.argsort(-lp[top])]
    return lp[token[0]], top, lp[top]


def _report(token: int, report) -> TokenLogprob:
    chosen, top, values = report
    return TokenLogprob(token, chosen.item(), list(zip(top.tolist(), values.tolist())))


class Submitted:
    """One submitted sequence as what engine.stream.stream_reply generates by (its Generator): the tokens come
    from the scheduler's thread; logprobs reported per token are appended to `logprobs` as they are handed out."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer):
        self.seq, self.tokenizer = seq, tokenizer
        self.logprobs: list[TokenLogprob] = []

    def new_cache(self, **options) -> list:
        return []

    def generate_tokens(self, new_tokens, cache, sampling, *, max_tokens: int, stats: GenerationStats,
                        stop: threading.Event | None, context: list[int] = ()) -> Iterator[int]:
        seq = self.seq
        try:
            while (item := seq.out.get()) is not None:
                token, report = item
                if report is not None:
                    self.logprobs.append(report)
                for name in ("prompt_tokens", "prompt_seconds", "time_to_first_token", "generated_tokens",
                             "decode_seconds"):
                    setattr(stats, name, getattr(seq.stats, name))
                yield token
        finally:
            seq.stop.set()  # stream_reply stopped reading (a stop string): the scheduler drops the sequence
