"""Speculative decoding: a draft proposes k tokens, the target checks them all in one forward pass.

Decoding reads every weight once per token; verifying k drafted tokens reads them once for up to k + 1 tokens.
Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) keeps the output distributed exactly as the
target's: drafted token x, drawn from the draft's distribution q, is accepted with probability min(1, p(x)/q(x));
at the first rejection the token is drawn from normalize(max(0, p - q)) instead, and when all k are accepted one
more comes from the target's distribution after them. p and q are the distributions the sampler would draw from
(`sampling.probabilities`: repetition penalty, temperature, top-k, top-p, min-p applied to both alike); greedy is
the one-hot case, where this reduces to "keep the drafted tokens while they equal the target's argmax".

After a round every cache holds exactly the accepted tokens: the target's KV caches are trimmed by the rejected
tokens, the draft's likewise. A recurrent state (the hybrid models' Gated DeltaNet layers) cannot forget tokens:
it keeps a passing snapshot at every position of the round (the layer runs the verify's tokens one by one), is
restored from the one at the accepted prefix, and the round's snapshots are dropped.
How many tokens to draft adapts to the measured acceptance and costs (DraftLength).

Draft sources: DraftModel (a smaller model with its own cache) and MTPDraft (the checkpoint's own MTP head, which
reads the target's hidden states: the target's forward hands them over, see Draft.wants_hidden).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx
import numpy as np

from qwen_mlx.cache.kv import KVCache, LayerCache, make_cache
from qwen_mlx.cache.prefix import common_prefix
from qwen_mlx.cache.recurrent import RecurrentCache, forget_passing, keep_snapshots, restore_point, settle
from qwen_mlx.engine.generate import GenerationStats, generation_stream, prefill
from qwen_mlx.engine.sampling import SamplingParams, probabilities
from qwen_mlx.models.qwen3 import Cache, Model

MAX_DRAFT = 8  # a rotating cache's slack (cache.kv.MIN_SLACK) keeps a round's rejected drafts trimmable


class Draft(Protocol):
    """Where drafted tokens come from: a smaller model of the same vocabulary, the model's own MTP head, or (in
    tests) an oracle."""

    # Whether it reads the target's hidden states: then `accepted` is handed them, also after each chunk of the
    # prompt the target runs, and `sync` is not called.
    wants_hidden: bool

    def follow(self, cache: list[Cache]) -> None:
        """Called as a generation starts, with the target's cache (its kinds: window, KV bits): a draft with a
        cache of its own keeps it of the same kind, so that its memory follows the target's."""

    def sync(self, tokens: list[int]) -> None:
        """Hold exactly `tokens` (the whole context before the last token, as the target's cache does), reusing
        what it already holds of them (a chat's earlier turns)."""

    def propose(self, seen: list[int], history: list[int], k: int, params: SamplingParams,
                rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        """Up to k tokens to follow `seen` (the whole context and the accepted tokens; fewer only when it cannot
        draft yet), each drawn from the draft's distribution q given the ones before (its repetition penalty over
        `history`, as the target's), and those distributions (n, vocab) float64; None for q when each is one-hot at
        its token (greedy, an oracle)."""

    def accepted(self, seen: list[int], hidden: mx.array | None) -> None:
        """The round is over and `seen` is what was accepted: forget what it drafted beyond that. `hidden`
        (wants_hidden only, else None): the target's hidden states (m, dim), after its final norm, at the m
        positions its cache just gained, the last m of seen[:-1]."""


def verify(drafted: list[int], p: np.ndarray, q: np.ndarray | None, rng: np.random.Generator) -> list[int]:
    """Speculative sampling: the tokens to emit after a round, 1 to k + 1 of them.

    drafted: k tokens; p: (k + 1, vocab) the target's distributions at each drafted position and after the last;
    q: (k, vocab) the draft's distributions the drafted tokens were drawn from (None: each row one-hot at its
    drafted token). The first len(result) - 1 drafted tokens are accepted, the last token is the correction or
    the bonus token."""
    out = []
    for i, x in enumerate(drafted):
        qx = 1.0 if q is None else q[i, x]
        if rng.random() * qx < p[i, x]:  # accept with probability min(1, p(x) / q(x)); q(x) > 0 as x ~ q
            out.append(x)
            continue
        residual = np.maximum(p[i] - (q[i] if q is not None else _one_hot(x, p.shape[1])), 0.0)
        out.append(_draw(residual, rng))
        return out
    out.append(_draw(p[len(drafted)], rng))
    return out


def verify_greedy(drafted: list[int], target_argmax: list[int]) -> list[int]:
    """verify() when p and q are one-hot (greedy): keep drafted tokens while they equal the target's argmax, then
    the target's own token. target_argmax: k + 1 tokens."""
    out = []
    for x, t in zip(drafted, target_argmax):
        if x != t:
            break
        out.append(x)
    out.append(target_argmax[len(out)])
    return out


def _one_hot(x: int, n: int) -> np.ndarray:
    v = np.zeros(n)
    v[x] = 1.0
    return v


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn with probability proportional to `weights` (float64, non-negative, not all zero)."""
    cdf = np.cumsum(weights)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(weights) - 1))


@dataclass
class DraftLength:
    """How many tokens to draft next: fixed, or the k in 0..max_k with the best expected tokens per second,
    (1 - a^(k+1)) / (1 - a) tokens per round for acceptance rate a, over the measured round time. k = 0 (plain
    decoding) wins when drafting does not pay; it is probed again now and then."""

    fixed: int | None = None
    max_k: int = 6
    acceptance: float = 0.6  # running estimate, per drafted token
    seconds: dict[int, float] = field(default_factory=dict)  # running round time per k
    rounds: int = 0

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        self.rounds += 1
        for k in (0, 1, 2, 4):  # measure a few lengths first
            if k <= self.max_k and k not in self.seconds:
                return k
        if self.rounds % 16 == 0:  # re-probe a neighbour of the best so the estimate can move
            best = self._best()
            return min(self.max_k, best + 1) if best < self.max_k else max(0, best - 1)
        return self._best()

    def _best(self) -> int:
        a = min(self.acceptance, 0.999)
        return max(range(self.max_k + 1), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / self._time(k))

    def _time(self, k: int) -> float:
        if k in self.seconds:
            return self.seconds[k]
        known = sorted(self.seconds)  # linear in k between (or beyond) the measured lengths
        lo = max((j for j in known if j < k), default=known[0])
        hi = min((j for j in known if j > k), default=known[-1])
        if lo == hi:
            lo, hi = known[0], known[-1]
        if lo == hi:
            return self.seconds[lo] * (1 + k) / (1 + lo)
        slope = (self.seconds[hi] - self.seconds[lo]) / (hi - lo)
        return max(1e-9, self.seconds[lo] + slope * (k - lo))

    def update(self, k: int, accepted: int, seconds: float) -> None:
        old = self.seconds.get(k)
        self.seconds[k] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if k:
            self.acceptance = 0.8 * self.acceptance + 0.2 * (accepted / k)


def speculative_tokens(model: Model, draft: Draft, prompt: list[int], cache: list[Cache], params: SamplingParams, *,
                       context: list[int] = (), max_tokens: int = 256, length: DraftLength | None = None,
                       prefill_chunk: int = 512, stats: GenerationStats | None = None,
                       stop: threading.Event | None = None) -> Iterator[int]:
    """Yield up to max_tokens token ids after `prompt`, distributed exactly as generate_tokens' sampling would
    give them (greedy: identical tokens). `cache` holds `context` (earlier turns) and not yet `prompt`.

    Each round drafts k tokens, runs the target once over the last token and the k drafted ones, keeps the
    accepted prefix and trims every cache back to it. When the caller stops, the cache holds the prompt and the
    yielded tokens except possibly the last one (as generate_tokens)."""
    if not prompt:
        raise ValueError("speculative_tokens needs at least one prompt token")
    try:
        with mx.stream(generation_stream()):
            yield from _speculate(model, draft, prompt, cache, params, list(context), max_tokens,
                                  length or DraftLength(), prefill_chunk,
                                  stats if stats is not None else GenerationStats(), stop)
    finally:
        settle(cache)  # see settle: the next generation may run on another thread


def _speculate(model: Model, draft: Draft, prompt: list[int], cache: list[Cache], params: SamplingParams,
               context: list[int], max_tokens: int, length: DraftLength, prefill_chunk: int, stats: GenerationStats,
               stop: threading.Event | None) -> Iterator[int]:
    stats._start = time.perf_counter()
    mx.reset_peak_memory()
    rng = np.random.default_rng(params.seed)
    history = list(prompt)  # what the repetition penalty looks at, as in generate_tokens
    seen = context + history  # the whole sequence, for the draft
    draft.follow(cache)
    if draft.wants_hidden:
        if not _prefill_with_hidden(model, draft, seen, len(context), cache, prefill_chunk, stop):
            return
    else:
        if not prefill(model, mx.array(prompt[:-1], dtype=mx.uint32), cache, chunk=prefill_chunk, stop=stop):
            return
        draft.sync(seen[:-1])
    greedy = params.temperature <= 0
    produced, first = 0, None
    while produced < max_tokens:
        if stop is not None and stop.is_set():
            return
        started = time.perf_counter()
        k = min(length.next(), max_tokens - produced - 1)
        drafted, q = draft.propose(seen, history, k, params, rng) if k > 0 else ([], None)
        k = len(drafted)
        held = cache[0].offset  # the context and history but its last token
        keep_snapshots(cache, range(held + 1, held + k + 1), passing=True)  # each acceptable prefix
        hidden = model.model(mx.array([history[-1], *drafted], dtype=mx.uint32)[None], cache)  # (1, k + 1, dim)
        logits = model.head(hidden)[0]  # (k + 1, vocab)
        if greedy and params.repetition_penalty == 1.0:
            out = verify_greedy(drafted, mx.argmax(logits, axis=-1).tolist())
        else:
            p = np.stack([np.asarray(probabilities(logits[i : i + 1], history + drafted[:i], params)[0],
                                     dtype=np.float64) for i in range(k + 1)])
            out = verify(drafted, p, q, rng)
        rejected = k + 1 - len(out)  # the target ran k + 1 tokens; it keeps history[-1] and the accepted ones
        if rejected and any(c.trim(rejected) != rejected for c in cache):
            raise RuntimeError("a cache could not forget the rejected draft tokens (rotating cache slack too small)")
        forget_passing(cache)
        history.extend(out)
        seen.extend(out)
        draft.accepted(seen, hidden[0, :len(out)] if draft.wants_hidden else None)  # the positions kept
        stats.forwards += 1
        stats.drafted += k
        stats.accepted += len(out) - 1
        length.update(k, len(out) - 1, time.perf_counter() - started)
        for token in out:
            now = time.perf_counter()
            if first is None:
                first = now
                stats.prompt_tokens = len(prompt)
                stats.time_to_first_token = stats.prompt_seconds = now - stats._start
            produced += 1
            stats.generated_tokens = produced
            stats.decode_seconds = now - first
            stats.peak_memory = mx.get_peak_memory()
            yield token
            if produced >= max_tokens or (stop is not None and stop.is_set()):
                return


def _prefill_with_hidden(model: Model, draft: Draft, seen: list[int], start: int, cache: list[Cache], chunk: int,
                         stop: threading.Event | None) -> bool:
    """prefill() of seen[start:-1] (the target's cache holds seen[:start]) for a draft that reads the target's
    hidden states: each chunk's go to draft.accepted (at least once, so that it learns the context). Returns False
    if `stop` was set between chunks."""
    end = len(seen) - 1
    for a in range(start, max(end, start + 1), chunk):
        if stop is not None and stop.is_set():
            return False
        b = min(a + chunk, end)
        hidden = model.model(mx.array(seen[a:b], dtype=mx.uint32)[None], cache)[0] if b > a else \
            mx.zeros((0, model.config.hidden_size))  # (b - a, dim)
        mx.eval(hidden, [c.state for c in cache])
        draft.accepted(seen[:b + 1], hidden)
    return True


def _choose(logits: mx.array, history: list[int], params: SamplingParams,
            rng: np.random.Generator) -> tuple[int, np.ndarray | None]:
    """A draft's token from its logits (1, vocab), drawn from its distribution q, and q (None when greedy)."""
    if params.temperature <= 0 and params.repetition_penalty == 1.0:
        return int(mx.argmax(logits, axis=-1).item()), None
    q = np.asarray(probabilities(logits, history, params)[0], dtype=np.float64)
    return _draw(q, rng), q


def _attention_cache(cache: list[Cache]) -> LayerCache:
    """The target's first attention-layer cache: the kind and settings (window, KV bits) a draft's caches follow."""
    return next(c for c in cache if not isinstance(c, RecurrentCache))


class DraftModel:
    """A smaller model of the same vocabulary (Qwen3-0.6B for Qwen3-8B, Qwen3.5-0.8B for Qwen3.5-9B) with its
    own cache, drafting autoregressively with the target's sampling settings.

    Its cache is built for its own model (cache.kv.make_cache over its config: its layer kinds and head_dim) with
    the target's settings (follow): under a window its attention layers are windows of the same size, pinned
    tokens and slack, so its memory stays flat as the target's does; with KV bits they are quantized alike. Where
    it cannot go back as far as a new sequence parts from the one it holds (the ring has moved on: another prompt,
    a chat turn resumed inside an earlier reply), it starts over from an empty cache and runs the tokens again."""

    wants_hidden = False

    def __init__(self, model: Model):
        self.model = model
        self.options: dict = {}  # the make_cache options of its cache
        self.cache: list[Cache] = make_cache(model.config)
        self.held: list[int] = []  # the tokens its cache holds

    def follow(self, cache: list[Cache]) -> None:
        """Take the settings of the target's attention caches (window, KV bits); a KV group size that does not
        divide the draft's head_dim falls back to make_cache's default for it. New settings: a new, empty cache."""
        options = _attention_cache(cache).options
        if "group_size" in options and self.model.config.head_dim % options["group_size"]:
            options = {**options, "group_size": None}
        if options != self.options:
            self.options, self.cache, self.held = options, make_cache(self.model.config, **options), []

    def sync(self, tokens: list[int]) -> None:
        self._forget_after(tokens)
        if len(tokens) > len(self.held):
            prefill(self.model, mx.array(tokens[len(self.held):], dtype=mx.uint32), self.cache)
        self.held = list(tokens)

    def propose(self, seen: list[int], history: list[int], k: int, params: SamplingParams,
                rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        pending = seen[len(self.held):]  # accepted tokens it has not run yet (at least the last one)
        self.held = list(seen)
        keep_snapshots(self.cache, range(len(seen), len(seen) + k), passing=True)  # where the round may end
        drafted, qs = [], []
        for i in range(k):
            logits = self.model(mx.array(pending, dtype=mx.uint32)[None], self.cache)[0, -1:]
            token, q = _choose(logits, history + drafted, params, rng)
            if q is not None:
                qs.append(q)
            drafted.append(token)
            pending = [token]
            if i < k - 1:
                self.held.append(token)
        return drafted, (np.stack(qs) if qs else None)

    def accepted(self, seen: list[int], hidden: mx.array | None) -> None:
        self._forget_after(seen)

    def _forget_after(self, tokens: list[int]) -> None:
        """Trim the cache to the longest prefix it shares with `tokens` (a recurrent draft: to its latest restore
        point within it, possibly the start); where it cannot go back that far, start over from an empty cache
        (the tokens are run again: by sync, or by the next propose)."""
        keep = restore_point(self.cache, common_prefix(self.held, tokens))
        extra = len(self.held) - keep
        if extra and any(c.trim(extra) != extra for c in self.cache):  # a window that moved on: start over
            self.cache, keep = make_cache(self.model.config, **self.options), 0
        forget_passing(self.cache)
        settle(self.cache)
        self.held = self.held[:keep]


class MTPDraft:
    """The checkpoint's own multi-token-prediction head (Qwen3.5, Qwen3-Next: models.qwen3_5.MTP) as the draft.

    Its layer runs over pairs: pair i is (token i + 1, the target's hidden state at position i), at position i of
    its own KV cache, and its output h' gives the logits of token i + 2 through the target's head. After each
    round it holds exactly the pairs of the target's cache positions, made from the target's hidden states; the
    last one's h' drafts the first token of the next round, and each further token runs one more pair made of
    the token just drafted and the h' before it (the pairs made of h' are dropped at the end of the round).

    Its cache is of the kind the target's attention layers use (follow): under a window (a RotatingKVCache of the
    same size, pinned tokens and slack) its memory stays flat as the target's does, with KV bits it is quantized
    alike. Where it cannot go back as far as a new sequence parts from the one it holds (the ring has moved on:
    another prompt, a chat turn resumed inside an earlier reply), it starts over from an empty cache and runs the
    pairs again: from the target's hidden states where the target hands them over (it then ran the whole sequence
    too), from the tokens alone before that. Drafts may suffer; the output does not (verify decides)."""

    wants_hidden = True
    CHUNK = 512  # pairs per forward when it runs many (a prompt, starting over): attention's memory stays bounded

    def __init__(self, model: Model):
        self.model, self.mtp = model, model.mtp
        self.cache: LayerCache = KVCache()
        self.seen: list[int] = []  # the tokens its pairs were made of: pair i holds seen[i + 1]
        self.last: mx.array | None = None  # (1, 1, dim): h' of the last pair

    def follow(self, cache: list[Cache]) -> None:
        like = _attention_cache(cache)
        if (type(like), like.options) != (type(self.cache), self.cache.options):
            self.cache, self.seen, self.last = like.empty(), [], None

    def sync(self, tokens: list[int]) -> None:
        """Not called (wants_hidden): it learns the context from `accepted`, which the prefill calls."""

    def propose(self, seen: list[int], history: list[int], k: int, params: SamplingParams,
                rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        if self.last is None or self.cache.offset != len(seen) - 1:
            return [], None  # no pair yet (a one-token prompt): the target's first forward gives one
        h, drafted, qs = self.last, [], []
        for i in range(k):
            token, q = _choose(self.model.head(h)[0], history + drafted, params, rng)
            if q is not None:
                qs.append(q)
            drafted.append(token)
            if i < k - 1:
                h = self.mtp(self._embed([token]), h, self.cache)  # the pair at position len(seen) - 1 + i
        if k > 1 and self.cache.trim(k - 1) != k - 1:
            raise RuntimeError("the MTP head's cache could not forget its drafted pairs")
        return drafted, (np.stack(qs) if qs else None)

    def accepted(self, seen: list[int], hidden: mx.array) -> None:
        start = len(seen) - 1 - hidden.shape[0]  # the position of hidden's first row
        pairs = self.cache.offset
        keep = min(pairs, start, max(common_prefix(self.seen, seen) - 1, 0))
        if keep < pairs:
            self.last = None
            if self.cache.trim(pairs - keep) != pairs - keep:  # a window that moved on: start over
                self.cache, keep = self.cache.empty(), 0
        if keep < start:
            # Positions whose hidden states the target no longer has (a chat turn resumed inside the earlier
            # reply, starting over): their pairs are made of the token alone (a zero hidden state normalises to
            # zero), so the later pairs stay at their positions.
            hidden = mx.concatenate([mx.zeros((start - keep, hidden.shape[1]), hidden.dtype), hidden])
        for a in range(0, hidden.shape[0], self.CHUNK):
            b = min(a + self.CHUNK, hidden.shape[0])
            self.last = self.mtp(self._embed(seen[keep + 1 + a:keep + 1 + b]), hidden[None, a:b], self.cache)[:, -1:]
            mx.eval(self.last, self.cache.state)
        self.seen = list(seen)

    def _embed(self, tokens: list[int]) -> mx.array:
        return self.model.model.embed_tokens(mx.array(tokens, dtype=mx.uint32)[None])  # (1, L, dim)
