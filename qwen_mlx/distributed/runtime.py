"""One model over several processes or Macs with `mx.distributed` (ring over TCP, JACCL over Thunderbolt, MPI).

Three ways to split it (`--mode`, see shard.py and plan.py):
- pipeline: contiguous stages of decoder layers balanced by weight bytes (uneven counts allowed); each rank reads
  only its own stage's tensors; hidden states go rank to rank with send/recv; the last rank samples.
- tensor: in every layer the attention heads (Q/K/V by heads, KV heads split so that each group of query heads
  stays with its KV head; O by its input) and the dense MLP (gate/up by columns, down by its input) are split, with
  one all_sum after the attention and one after the MLP; MoE layers split their experts as in `expert`.
- expert: MoE experts split across ranks (uneven counts allowed), everything else replicated; the ranks' weighted
  expert outputs are combined with one all_sum per MoE layer.

Every rank runs the engine's decode loop (engine.generate.decode) with its own forward; after each step one
all_sum shares the sampling rank's token and rank 0's stop request, so all ranks feed the same token next and
stop at the same step. `qwen-mlx generate|chat --distributed MODE` runs through `run_ranks`: rank 0 gets a
DistributedLLM (the usual LLM interface), the other ranks `serve` it. For checks and benchmarks see __main__.py.

A rank that dies closes its sockets: the others' next exchange fails within about a second and each ends with one
line on stderr. A rank that hangs or a host that vanishes without closing its sockets is caught by the watchdog:
no step may take longer than --timeout seconds.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.api import LLM
from qwen_mlx.cache.kv import make_cache
from qwen_mlx.distributed.plan import DistributedError, choose_mode
from qwen_mlx.distributed.shard import load_rank
from qwen_mlx.distributed.watchdog import Watchdog, connect, failures
from qwen_mlx.engine.generate import GenerationStats, Lockstep, decode, greedy, logits_last
from qwen_mlx.engine.sampling import SamplingParams, make_sampler
from qwen_mlx.engine.tokenizer import Tokenizer
from qwen_mlx.models.qwen3 import Model
from qwen_mlx.weights.loader import load_config, resolve


class Runner:
    """One rank's part of the model (its stage, or its slices of every layer, see shard.py) in its group: what
    the engine's loop runs on this rank. Every rank runs the model's own forward; only the sampling rank (the
    last in a pipeline, rank 0 otherwise) computes logits."""

    def __init__(self, model: Model, mode: str, group: mx.distributed.Group, stage: range | None = None):
        self.model, self.mode, self.group = model, mode, group
        self.rank, self.size = group.rank(), group.size()
        self.stage = stage if stage is not None else range(model.config.num_hidden_layers)
        self.samples = self.rank == (self.size - 1 if mode == "pipeline" else 0)

    def new_cache(self, **options) -> list:
        """This rank's KV cache: its own layers (pipeline) or its own KV heads (tensor), any cache.make_cache kind."""
        return make_cache(self.model.config, **options)[self.stage.start:self.stage.stop]

    def logits(self, ids: mx.array, cache: list) -> mx.array:
        """ids (L,) -> float32 logits of the last position (1, vocab) on the sampling rank; elsewhere a (1, 2)
        stand-in that depends on this rank's work, so that sharing the token runs it (not (1, 1): MLX makes the
        argmax over one value a constant, cut off from the work)."""
        if self.samples:
            return logits_last(self.model, ids, cache)
        h = self.model.model(ids[None], cache)  # (1, L, dim): the final hidden states, or those sent on
        return h[:, -1, :2].astype(mx.float32)

    def fill(self, ids: mx.array, cache: list) -> list[mx.array]:
        """ids (L,) into the cache; returns this rank's output to evaluate (a stage's output is sent on)."""
        return [self.model.model(ids[None], cache)]

    def lockstep(self, cache: list, watchdog: Watchdog) -> Lockstep:
        def share(token: mx.array | None, stop: bool) -> mx.array:
            """[the sampling rank's token, rank 0's stop request] (2,) uint32 on every rank: one all_sum."""
            watchdog.renew("decoding" if token is not None else "prefilling")
            mine = mx.zeros((1,), mx.uint32)
            if token is not None:  # a non-sampling rank adds 0, after its own work for this step
                mine = token.astype(mx.uint32) if self.samples else mx.depends(mine, token)
            return mx.distributed.all_sum(mx.concatenate([mine, mx.array([stop], mx.uint32)]), group=self.group)

        def forget(n: int) -> None:
            for c in cache:
                c.trim(n)

        return Lockstep(share, forget)


@dataclass
class Turn:
    """What rank 0 tells every rank before each reply."""

    keep: int  # tokens of the KV cache to keep (the prefix shared with the last turn); 0: start a new cache
    tokens: list[int]  # the tokens to run after those
    sampling: dict  # SamplingParams fields
    max_tokens: int
    eos: list[int] = field(default_factory=list)  # token ids that end the reply
    cache: dict = field(default_factory=dict)  # make_cache options of a new cache


def share_turn(group: mx.distributed.Group, turn: Turn | None, watchdog: Watchdog) -> Turn | None:
    """Rank 0's turn (None: the session is over) on every rank: its JSON's length, then its bytes, each with one
    all_sum. The other ranks wait here for as long as the user takes to write the next message."""
    data = json.dumps(asdict(turn)).encode() if turn is not None and group.rank() == 0 else b""
    with watchdog.guard("sharing the next prompt", limited=group.rank() == 0):
        size = int(mx.distributed.all_sum(mx.array([len(data)], mx.int32), group=group).item())
        if size == 0:
            return None
        mine = mx.array(np.frombuffer(data, np.uint8).astype(np.int32)) if data else mx.zeros((size,), mx.int32)
        got = np.array(mx.distributed.all_sum(mine, group=group)).astype(np.uint8).tobytes()
    return Turn(**json.loads(got))


def reply(runner: Runner, cache: list, turn: Turn, watchdog: Watchdog, *, stop: threading.Event | None = None,
          stats: GenerationStats | None = None) -> Iterator[int]:
    """One reply, run by every rank in step through the engine's loop: each rank gets the same token ids and stops
    at the same step (after an eos token, after max_tokens, or where rank 0's `stop` or its closing this generator
    reaches the others; the cache then holds what generate.decode says)."""
    sampler = make_sampler(SamplingParams(**turn.sampling)) if runner.samples else greedy
    with watchdog.guard("decoding"):
        yield from decode(lambda ids: runner.logits(ids, cache), lambda ids: runner.fill(ids, cache), turn.tokens,
                          sampler=sampler, max_tokens=turn.max_tokens, stats=stats, stop=stop,
                          lockstep=runner.lockstep(cache, watchdog), eos=turn.eos)


def serve(runner: Runner, watchdog: Watchdog) -> None:
    """A rank other than 0: run every turn rank 0 shares, in step with it, until it says the session is over."""
    cache: list = []
    while (turn := share_turn(runner.group, None, watchdog)) is not None:
        if turn.keep == 0:
            cache = runner.new_cache(**turn.cache)
        elif cache[0].offset > turn.keep:  # rank 0 kept this prefix of its identical cache: so can this rank
            trim = cache[0].offset - turn.keep
            for c in cache:
                c.trim(trim)
        for _ in reply(runner, cache, turn, watchdog):
            pass


class DistributedLLM(LLM):
    """Rank 0's side of a model split over several ranks (the others run `serve`): an LLM whose every reply runs
    on all ranks, so api.LLM.stream, chat.ChatSession and the chat app work unchanged."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, path: Path, watchdog: Watchdog):
        super().__init__(runner.model, tokenizer, path)
        self._runner, self._watchdog = runner, watchdog
        self._cache_options: dict = {}

    @property
    def description(self) -> str:
        """How the model is split, e.g. "pipeline over 2 ranks"."""
        return f"{self._runner.mode} over {self._runner.size} ranks"

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Run `callback` first when a lost rank ends this process from another thread (the chat app gives the
        terminal back there)."""
        self._watchdog.on_exit = callback

    def new_cache(self, **options) -> list:
        self._cache_options = options  # the other ranks build theirs alike when a turn starts a new cache
        return self._runner.new_cache(**options)

    def speculate(self, draft: LLM | None, *, tokens: int | None = None) -> None:
        if draft is not None:
            raise DistributedError("speculative decoding (--draft-model, --mtp) does not run with --distributed yet")

    def generate_tokens(self, new_tokens: list[int], cache: list, sampling: SamplingParams, *, max_tokens: int,
                        stats: GenerationStats, stop: threading.Event | None,
                        context: list[int] = ()) -> Iterator[int]:
        turn = Turn(keep=cache[0].offset, tokens=new_tokens, sampling=asdict(sampling), max_tokens=max_tokens,
                    eos=list(self.tokenizer.eos_ids), cache=self._cache_options)
        share_turn(self._runner.group, turn, self._watchdog)
        return reply(self._runner, cache, turn, self._watchdog, stop=stop, stats=stats)

    def close(self) -> None:
        """Tell the other ranks the session is over (they return from `serve`)."""
        share_turn(self._runner.group, None, self._watchdog)


@contextmanager
def run_ranks(model: str, mode: str, *, verbose: bool = False, timeout: float = 60.0,
              backend: str = "any") -> Iterator[LLM | None]:
    """`qwen-mlx generate|chat --distributed MODE` on every rank: yields rank 0's DistributedLLM to the command,
    while every other rank serves it and is then given None. Started without a launcher (a group of one) it says
    so on stderr and yields the plain single-process LLM. With `verbose`, rank 0 says which mode auto chose."""
    watchdog = Watchdog(int(os.environ.get("MLX_RANK", "0")), timeout)
    with failures(watchdog):
        group = connect(watchdog, backend)
    if group.size() == 1:
        from qwen_mlx.api import load

        print(f"qwen-mlx: --distributed {mode}: one process, not several started by mlx.launch: running the whole "
              "model here", file=sys.stderr)
        yield load(model)
        return
    with failures(watchdog):
        path = resolve(model)
        if mode == "auto":
            mode, why = choose_mode(load_config(path), group.size())
            if verbose and group.rank() == 0:
                print(f"qwen-mlx: --distributed auto: {mode} ({why})", file=sys.stderr)
        model_share, stage = load_rank(path, mode, group)
        runner = Runner(model_share, mode, group, stage)
        watchdog.started = True
        if group.rank() != 0:
            serve(runner, watchdog)
            yield None
            return
        llm = DistributedLLM(runner, Tokenizer.from_dir(path), path, watchdog)
        try:
            yield llm
        finally:
            llm.close()
