"""One model over several processes or Macs with `mx.distributed` (ring over TCP, JACCL over Thunderbolt, MPI).

Three ways to split it (`--mode`):
- pipeline: contiguous stages of decoder layers balanced by weight bytes (uneven counts allowed); each rank reads
  only its own stage's tensors; hidden states go rank to rank with send/recv; the last rank samples.
- tensor: in every layer the attention heads (Q/K/V by heads, KV heads split so that each group of query heads
  stays with its KV head; O by its input) and the dense MLP (gate/up by columns, down by its input) are split, with
  one all_sum after the attention and one after the MLP; MoE layers split their experts as in `expert`.
- expert: MoE experts split across ranks (uneven counts allowed), everything else replicated; the ranks' weighted
  expert outputs are combined with one all_sum per MoE layer.

In every mode one all_sum per step shares the sampling rank's token and rank 0's stop flag, so all ranks feed the
same token next and stop at the same step. `qwen-mlx generate|chat --distributed MODE` runs through `run_ranks`:
rank 0 gets a DistributedLLM (the usual LLM interface), the other ranks `serve` it. For checks and benchmarks,
token ids in, JSON out, with MLX's launcher (`--` before `-m`):

    mlx.launch --backend ring -n 2 --python "$(which python)" -- -m qwen_mlx.distributed.runtime generate \\
        --model PATH --mode pipeline --prompt-ids 1,2,3 --max-tokens 32

A rank that dies closes its sockets: the others' next exchange fails within about a second and each ends with one
line on stderr. A rank that hangs or a host that vanishes without closing its sockets is caught by a watchdog:
no exchange may take longer than --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_flatten

from qwen_mlx.api import LLM
from qwen_mlx.cache.kv import make_cache
from qwen_mlx.engine.generate import GenerationStats, generation_stream
from qwen_mlx.engine.sampling import SamplingParams, make_sampler
from qwen_mlx.engine.tokenizer import Tokenizer
from qwen_mlx.errors import UserError
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.qwen3 import MLP, Model, SparseMoE
from qwen_mlx.weights.loader import load_config, load_model, read_index, resolve

MODES = ("pipeline", "tensor", "expert")
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}


class DistributedError(UserError):
    """A model cannot be split as asked (the message names the flag and the values that work)."""


# ---- planning -------------------------------------------------------------------------------------------------


def plan_stages(costs: list[int], n: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Split layers with these byte costs into n contiguous non-empty stages minimizing the largest stage; the first
    stage also holds `first_extra` bytes (the embedding), the last `last_extra` (norm and head)."""
    L = len(costs)
    if not 1 <= n <= L:
        raise DistributedError(f"a pipeline over {n} ranks needs at least {n} layers; this model has {L}: "
                               f"use -n 1 to {L}")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> int:  # layers i..j-1 as one stage
        return prefix[j] - prefix[i] + (first_extra if i == 0 else 0) + (last_extra if j == L else 0)

    # best[k][j]: the smallest largest stage when the first j layers form k stages; cut[k][j]: where the last starts
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, L + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    stages, j = [], L
    for k in range(n, 0, -1):
        stages.append(range(cut[k][j], j))
        j = cut[k][j]
    return stages[::-1]


def pipeline_plan(path: Path, cfg: ModelConfig, n: int) -> list[range]:
    """The stages for n ranks, balanced by the checkpoint's tensor bytes (read from the headers only)."""
    costs = [0] * cfg.num_hidden_layers
    first = last = 0
    for name, info in read_index(path).items():
        size = _DTYPE_BYTES.get(info.dtype, 4) * int(np.prod(info.shape))
        if name.startswith("model.layers."):
            costs[int(name.split(".")[2])] += size
        elif name.startswith("model.embed_tokens."):
            first += size
            last += size if cfg.tie_word_embeddings else 0
        else:  # final norm, LM head
            last += size
    return plan_stages(costs, n, first, last)


def memory_plan(path: Path, n: int) -> dict[str, list[int] | str]:
    """Weight bytes each of n ranks holds in each mode (from the checkpoint headers, nothing read), or the reason a
    mode does not apply; plus "kv_per_token": KV-cache bytes per token of context on each rank, per mode."""
    cfg = load_config(path)
    index = read_index(path)
    size = {name: _DTYPE_BYTES.get(info.dtype, 4) * int(np.prod(info.shape)) for name, info in index.items()}
    norm = next((info for name, info in index.items() if name.endswith("input_layernorm.weight")), None)
    kv_item = _DTYPE_BYTES.get(norm.dtype, 2) if norm else 2  # the cache holds the activations' dtype
    kv_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * kv_item  # keys and values of one token, one layer
    plan: dict = {}
    try:
        stages = pipeline_plan(path, cfg, n)
        per = [0] * n
        owner = {i: r for r, st in enumerate(stages) for i in st}
        for name, b in size.items():
            if name.startswith("model.layers."):
                per[owner[int(name.split(".")[2])]] += b
            elif name.startswith("model.embed_tokens."):
                per[0] += b
                if cfg.tie_word_embeddings and n > 1:
                    per[-1] += b
            else:
                per[-1] += b
        plan["pipeline"] = per
        plan["pipeline_kv_per_token"] = [len(st) * kv_layer for st in stages]
    except DistributedError as e:
        plan["pipeline"] = str(e)
    expert_share = max(len(expert_range(cfg.num_experts, r, n)) for r in range(n)) / cfg.num_experts \
        if cfg.num_experts and cfg.num_experts >= n else 1.0

    def share(split_dense: bool) -> int:
        total = 0
        for name, b in size.items():
            if ".mlp.experts." in name or ".mlp.switch_mlp." in name:
                total += b * expert_share
            elif split_dense and any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj")):
                total += b / n
            else:
                total += b
        return int(total)

    try:
        check_tensor_split(cfg, n)
        plan["tensor"] = [share(True)] * n
        plan["tensor_kv_per_token"] = [cfg.num_hidden_layers * kv_layer // n] * n
    except DistributedError as e:
        plan["tensor"] = str(e)
    if not cfg.num_experts:
        plan["expert"] = "no experts in this model"
    elif cfg.num_experts < n:
        plan["expert"] = f"{cfg.num_experts} experts cannot be split over {n} ranks"
    else:
        plan["expert"] = [share(False)] * n
        plan["expert_kv_per_token"] = [cfg.num_hidden_layers * kv_layer] * n
    return plan


def check_tensor_split(cfg: ModelConfig, n: int) -> None:
    """Raise naming the -n values that work when the heads (or MLP columns) of this model do not split n ways."""
    def ok(k: int) -> bool:
        if cfg.num_key_value_heads % k:
            return False
        dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
        if dense and cfg.intermediate_size % k:
            return False
        if cfg.num_experts and cfg.num_experts < k:
            return False
        group = (cfg.quantization or {}).get("group_size")
        if group and ((cfg.num_attention_heads // k * cfg.head_dim) % group
                      or (dense and (cfg.intermediate_size // k) % group)):
            return False  # a rank's slice of O or down must hold whole quantization groups
        return True

    if not ok(n):
        valid = [k for k in range(1, cfg.num_key_value_heads + 1) if ok(k)]
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        raise DistributedError(
            f"--mode tensor cannot split this model over -n {n}: each rank needs whole KV heads (with their "
            f"{rep} query heads each) of the {cfg.num_key_value_heads}, an equal share of the MLP columns and whole "
            f"quantization groups; use -n {' or '.join(map(str, valid))}, or --mode pipeline"
            + (" or expert" if cfg.num_experts else ""))


def expert_range(num_experts: int, rank: int, n: int) -> range:
    """This rank's experts: contiguous, the first num_experts % n ranks hold one more."""
    base, extra = divmod(num_experts, n)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


# ---- sharding (swaps modules from outside, like quant.py) -----------------------------------------------------


class ExpertShard(SparseMoE):
    """A SparseMoE holding only this rank's experts (loaded alone: load_model(experts=...)): the router runs on
    every rank, each rank applies the selected experts it holds (weighted; the others weigh zero) and one all_sum
    adds the ranks' parts."""

    def __init__(self, moe: SparseMoE, experts: range, group: mx.distributed.Group):
        nn.Module.__init__(self)
        held = moe.switch_mlp.down_proj.weight.shape[0]
        if held != len(experts):
            raise ValueError(f"an ExpertShard of experts {experts.start}..{experts.stop - 1} needs a layer holding "
                             f"those {len(experts)} experts, not {held}: load it with load_model(experts=...)")
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        self.gate, self.switch_mlp = moe.gate, moe.switch_mlp
        self._first, self._count, self._group = experts.start, len(experts), group

    def __call__(self, x: mx.array) -> mx.array:
        experts, weights = self.route(x)  # (B, L, k) each, the same on every rank
        local = experts - self._first
        mine = (local >= 0) & (local < self._count)
        # Pairs routed elsewhere run through local expert 0 and weigh zero (a gather needs a valid index).
        y = self.switch_mlp(x, mx.where(mine, local, 0).astype(experts.dtype), mx.where(mine, weights, 0.0))
        return mx.distributed.all_sum(y, group=self._group)  # (B, L, dim)


def shard_experts(model: Model, group: mx.distributed.Group) -> None:
    """The MoE layers of a model that holds this rank's experts (load_model(experts=rank_experts(...))) route
    over all the ranks' experts."""
    mine = rank_experts(model.config, group)
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp = ExpertShard(layer.mlp, mine, group)


def rank_experts(cfg: ModelConfig, group: mx.distributed.Group) -> range | None:
    """The experts this rank holds (None for a model without experts)."""
    if not cfg.num_experts:
        return None
    if cfg.num_experts < group.size():
        raise DistributedError(f"--mode expert splits {cfg.num_experts} experts: use -n 1 to {cfg.num_experts}")
    return expert_range(cfg.num_experts, group.rank(), group.size())


def shard_tensor(model: Model, group: mx.distributed.Group) -> None:
    """Attention heads and dense MLP columns split over the group; MoE layers (loaded with this rank's experts
    only, see shard_experts) split their experts."""
    n = group.size()
    check_tensor_split(model.config, n)
    for layer in model.layers:
        a = layer.self_attn
        a.q_proj, a.k_proj, a.v_proj = (shard_linear(p, "all-to-sharded", group=group)
                                        for p in (a.q_proj, a.k_proj, a.v_proj))
        a.o_proj = shard_linear(a.o_proj, "sharded-to-all", group=group)  # all_sum after the attention
        a.n_heads, a.n_kv_heads = a.n_heads // n, a.n_kv_heads // n  # contiguous slices keep GQA groups whole
        if isinstance(layer.mlp, MLP):
            m = layer.mlp
            m.gate_proj = shard_linear(m.gate_proj, "all-to-sharded", group=group)
            m.up_proj = shard_linear(m.up_proj, "all-to-sharded", group=group)
            m.down_proj = shard_linear(m.down_proj, "sharded-to-all", group=group)  # all_sum after the MLP
    shard_experts(model, group)


# ---- failure handling -----------------------------------------------------------------------------------------

LOST = "lost the connection to another rank (it exited or its host became unreachable); stopping"


def _die(rank: int, message: str, code: int = 1) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"qwen-mlx distributed: rank {rank}: {message}\n")
    sys.stderr.flush()
    os._exit(code)  # other threads may be blocked in a socket: do not wait for them


def _connection_lost(e: RuntimeError) -> bool:
    return "[ring]" in str(e) or "peer" in str(e)


class Watchdog:
    """Ends the process with one clear line when an exchange with the other ranks fails (a rank exited: its sockets
    closed) or takes longer than `timeout` (a host that vanished without closing its sockets, a rank stuck
    elsewhere), or on SIGTERM, which mlx.launch sends to every rank when one of them ends early. The last two are
    noticed by this thread even while the main thread is blocked inside MLX (where Python signal handlers cannot
    run). `on_exit` runs first (the chat app gives the terminal back there)."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.started = False  # set once every rank has loaded and generation begins
        self.on_exit: Callable[[], None] | None = None
        self._deadline: float | None = None
        self._what = ""
        self._signals = None
        if threading.current_thread() is threading.main_thread():
            import socket

            self._signals, wake = socket.socketpair()
            wake.setblocking(False)
            self._wake = wake  # kept open: the C-level handler writes each signal number to it
            signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
            signal.signal(signal.SIGTERM, lambda *_: self._terminated())
        threading.Thread(target=self._watch, daemon=True).start()

    @contextmanager
    def guard(self, what: str, *, limited: bool = True):
        """An exchange with the other ranks: bounded by `timeout` unless not `limited` (a rank waiting for the
        user's next message); a lost connection inside it ends the rank."""
        self._what, self._deadline = what, (time.monotonic() + self.timeout) if limited else None
        try:
            yield
        except RuntimeError as e:
            if _connection_lost(e):
                self.fail(f"{LOST} ({e})")
            raise
        finally:
            self._deadline = None

    def fail(self, message: str, code: int = 1) -> None:
        if self.on_exit is not None:
            try:
                self.on_exit()
            except Exception:  # the line below matters more than a clean screen
                pass
        _die(self.rank, message, code)

    def _terminated(self) -> None:
        if not self.started:  # a rank that failed while loading has said why; the others need not repeat it
            os._exit(1)
        self.fail("stopped by SIGTERM: mlx.launch sends it to every rank when another rank has ended (its error "
                  "is above) or on Ctrl-C")

    def _watch(self) -> None:
        import select

        while True:
            if self._signals is not None:
                ready, _, _ = select.select([self._signals], [], [], 0.1)
                if ready and signal.SIGTERM in self._signals.recv(64):
                    self._terminated()
            else:
                time.sleep(0.1)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self.fail(f"no answer from the other ranks within {self.timeout:g} s while {self._what}: a rank "
                          "has stopped or its host cannot be reached (raise --timeout if it is just slow)")


@contextmanager
def failures(watchdog: Watchdog):
    """A user error ends the rank with one line; one that every rank meets alike (a model that cannot be split as
    asked) is said by rank 0 only."""
    try:
        yield
    except DistributedError as e:
        if watchdog.rank == 0:
            _die(0, str(e), 2)
        time.sleep(1)  # mlx.launch stops every rank when one ends: let rank 0 say it first
        os._exit(2)
    except UserError as e:
        watchdog.fail(str(e), 2)


def connect(watchdog: Watchdog, backend: str = "any") -> mx.distributed.Group:
    """This process's group: all ranks when started by a launcher (mlx.launch sets MLX_RANK, MLX_HOSTFILE), else
    a group of one."""
    with watchdog.guard("connecting to the other ranks"):
        group = mx.distributed.init(backend=backend)
        # Ring ranks leave init one by one; past this barrier every rank is connected, so a rank that stops
        # later (a bad flag, a missing file) is seen by all the others.
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))
    watchdog.rank = group.rank()
    return group


# ---- generation -----------------------------------------------------------------------------------------------


def _bytes_sent() -> int | None:
    """Bytes this process's TCP sockets have sent and had acknowledged (Linux TCP_INFO tcpi_bytes_acked), summed
    over its sockets: the ring backend's real traffic. None where that cannot be read (macOS)."""
    import socket
    import struct

    if not hasattr(socket, "TCP_INFO") or not os.path.isdir("/proc/self/fd"):
        return None
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as s:  # closing the duplicate leaves the ring's socket open
                if s.type != socket.SOCK_STREAM:
                    continue
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
                total += struct.unpack_from("<Q", info, 120)[0]  # offset of tcpi_bytes_acked in struct tcp_info
        except (OSError, ValueError, struct.error):
            continue
    return total


class Runner:
    """One rank's part of the model; `forward` runs tokens through it (and this rank's cache) and returns the
    float32 logits on the sampling rank (None elsewhere)."""

    def __init__(self, model: Model, mode: str, group: mx.distributed.Group, stage: range | None = None):
        self.model, self.mode, self.group = model, mode, group
        self.rank, self.size = group.rank(), group.size()
        self.stage = stage if stage is not None else range(model.config.num_hidden_layers)
        self.sampler_rank = self.size - 1 if mode == "pipeline" else 0
        self.act_dtype = model.layers[0].input_layernorm.weight.dtype  # what the residual stream is held in

    def new_cache(self, **options) -> list:
        """This rank's KV cache: its own layers (pipeline) or its own KV heads (tensor), any cache.make_cache kind."""
        return make_cache(self.model.config, **options)[self.stage.start:self.stage.stop]

    def forward(self, ids: mx.array, cache: list, positions: str) -> mx.array | None:
        """ids (L,) -> logits (L or 1, vocab) float32 on the sampling rank; positions: "all", "last" or "none"."""
        if self.mode != "pipeline":
            h = self.model.model(ids[None], cache)
        else:
            r, n, m = self.rank, self.size, self.model.model
            if r == 0:
                h = m.embed_tokens(ids[None])
            else:
                h = mx.distributed.recv((1, ids.size, self.model.config.hidden_size), self.act_dtype, r - 1,
                                        group=self.group)
            for layer, c in zip(m.layers, cache):
                h = layer(h, c)
            if r < n - 1:
                mx.eval(mx.distributed.send(h.astype(self.act_dtype), r + 1, group=self.group))
                return None
            h = m.norm(h)
        if positions == "none" or self.rank != self.sampler_rank:
            mx.eval(h)  # the cache is written either way
            return None
        h = h if positions == "all" else h[:, -1:, :]
        return self.model.head(h)[0].astype(mx.float32)

    def exchange(self, token: mx.array | None, stop: bool) -> tuple[int, bool]:
        """The sampling rank's token and rank 0's stop flag, on every rank (one all_sum of two int32)."""
        mine = token.astype(mx.int32).reshape(1) if token is not None else mx.zeros((1,), mx.int32)
        both = mx.distributed.all_sum(mx.concatenate([mine, mx.array([int(stop)], mx.int32)]), group=self.group)
        token_id, stopped = both.tolist()
        return token_id, bool(stopped)


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


def decode(runner: Runner, cache: list, turn: Turn, watchdog: Watchdog, *, stop: Callable[[], bool] = lambda: False,
           stats: GenerationStats | None = None, prefill_chunk: int = 512,
           logits_out: Path | None = None) -> Iterator[int]:
    """One reply, run by every rank in step: each rank gets the same token ids. Every rank stops at the same step:
    after an eos token, after max_tokens, or when rank 0's `stop()` is true at an exchange (one per prefill chunk,
    one per token). If rank 0 stops reading early (closes this generator) it runs one more step to stop the
    others there; the cache then holds every token read, as generate.generate_tokens may also leave it."""
    stats = stats if stats is not None else GenerationStats()
    with mx.stream(generation_stream()):  # a thread's own stream: the chat app decodes on a worker thread
        yield from _decode(runner, cache, turn, watchdog, stop, stats, prefill_chunk, logits_out)


def _decode(runner: Runner, cache: list, turn: Turn, watchdog: Watchdog, stop: Callable[[], bool],
            stats: GenerationStats, prefill_chunk: int, logits_out: Path | None) -> Iterator[int]:
    start = time.perf_counter()
    mx.reset_peak_memory()
    sampler = make_sampler(SamplingParams(**turn.sampling)) if runner.rank == runner.sampler_rank else None
    history = list(turn.tokens)

    def step(ids: mx.array, what: str, positions: str = "last") -> tuple[int, bool]:
        with watchdog.guard(what):
            logits = runner.forward(ids, cache, positions)
            if logits is not None and logits_out is not None:
                np.save(logits_out, np.array(logits))
            token = sampler(logits[-1:], history) if logits is not None else None
            return runner.exchange(token, stop())

    ids = mx.array(turn.tokens, dtype=mx.uint32)
    # With logits_out the prompt runs in one piece and its logits at every position are kept (for checks);
    # otherwise all but its last token are prefilled in chunks and only the last position reaches the head.
    last = 0 if logits_out is not None else ids.size - 1
    for s in range(0, last, prefill_chunk):
        chunk = ids[s:min(s + prefill_chunk, last)]
        with watchdog.guard(f"prefilling tokens {s}..{s + chunk.size - 1}"):
            runner.forward(chunk, cache, "none")
            if runner.exchange(None, stop())[1]:
                return
    token, stopped = step(ids[last:], "computing the first token", "all" if logits_out is not None else "last")
    logits_out = None
    first = time.perf_counter()
    stats.prompt_tokens = len(turn.tokens)
    stats.time_to_first_token = stats.prompt_seconds = first - start
    eos, n = set(turn.eos), 1
    while not stopped:
        stats.generated_tokens, stats.decode_seconds = n, time.perf_counter() - first
        stats.peak_memory = mx.get_peak_memory()
        try:
            yield token
        except GeneratorExit:
            if token not in eos and n < turn.max_tokens:  # the other ranks go on to the next step: stop them there
                with watchdog.guard("stopping the other ranks"):
                    runner.forward(mx.array([token], dtype=mx.uint32), cache, "none")
                    runner.exchange(None, True)
            raise
        if token in eos or n == turn.max_tokens:
            return
        history.append(token)
        token, stopped = step(mx.array([token], dtype=mx.uint32), f"decoding token {n + 1}")
        n += 1


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
        for _ in decode(runner, cache, turn, watchdog):
            pass


class DistributedLLM(LLM):
    """Rank 0's side of a model split over several ranks (the others run `serve`): an LLM whose every reply runs
    on all ranks, so api.LLM.stream, chat.ChatSession and the chat app work unchanged."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, path: Path, watchdog: Watchdog):
        super().__init__(runner.model, tokenizer, path)
        self.runner, self.watchdog = runner, watchdog
        self._cache_options: dict = {}

    def new_cache(self, **options) -> list:
        self._cache_options = options  # the other ranks build theirs alike when a turn starts a new cache
        return self.runner.new_cache(**options)

    def generate_tokens(self, new_tokens: list[int], cache: list, sampling: SamplingParams, *, max_tokens: int,
                        stats: GenerationStats, stop: threading.Event | None) -> Iterator[int]:
        turn = Turn(keep=cache[0].offset, tokens=new_tokens, sampling=asdict(sampling), max_tokens=max_tokens,
                    eos=list(self.tokenizer.eos_ids), cache=self._cache_options)
        share_turn(self.runner.group, turn, self.watchdog)
        return decode(self.runner, cache, turn, self.watchdog, stop=stop.is_set if stop is not None else lambda: False,
                      stats=stats)

    def close(self) -> None:
        """Tell the other ranks the session is over (they return from `serve`)."""
        share_turn(self.runner.group, None, self.watchdog)


# ---- entry points ---------------------------------------------------------------------------------------------


def choose_mode(cfg: ModelConfig, n: int) -> tuple[str, str]:
    """`--distributed auto`: (mode, why). A mixture of experts splits its experts (one exchange per layer); a dense
    model splits its heads when they divide n ways (each rank reads 1/n of every layer), else its layers."""
    if cfg.num_experts >= n > 1 and cfg.num_experts:
        return "expert", f"a mixture-of-experts model: its {cfg.num_experts} experts split over {n} ranks"
    try:
        check_tensor_split(cfg, n)
        return "tensor", f"a dense model whose {cfg.num_key_value_heads} KV heads split over {n} ranks"
    except DistributedError:
        return "pipeline", f"its {cfg.num_key_value_heads} KV heads do not split over {n} ranks: layers do"


def load_rank(path: Path, mode: str, group: mx.distributed.Group,
              dtype: mx.Dtype | None = None) -> tuple[Model, range | None]:
    """This rank's share of the model: its pipeline stage, or its slices of every layer."""
    cfg = load_config(path)
    if mode == "pipeline":
        stage = pipeline_plan(path, cfg, group.size())[group.rank()]
        return load_model(path, dtype=dtype, layers=stage)[0], stage
    if mode == "tensor":
        check_tensor_split(cfg, group.size())  # before reading anything
        return load_model(path, dtype=dtype, experts=rank_experts(cfg, group),
                          prepare=lambda m: shard_tensor(m, group))[0], None
    if not cfg.num_experts:
        raise DistributedError(f"--mode expert needs a mixture-of-experts model; {cfg.model_type} has no experts: "
                               "use --mode pipeline or tensor")
    return load_model(path, dtype=dtype, experts=rank_experts(cfg, group),
                      prepare=lambda m: shard_experts(m, group))[0], None


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


def _generate_cmd(args: argparse.Namespace) -> None:
    watchdog = Watchdog(int(os.environ.get("MLX_RANK", "0")), args.timeout)
    with failures(watchdog):
        group = connect(watchdog, args.backend)
        rank = group.rank()
        model, stage = load_rank(resolve(args.model), args.mode, group)
        n_bytes = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
        load_peak = mx.get_peak_memory()
        runner = Runner(model, args.mode, group, stage)
        cache = runner.new_cache(max_size=args.max_kv_size, bits=args.kv_bits, group_size=args.kv_group_size)
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        if not prompt:
            raise UserError("--prompt-ids: give at least one token id, e.g. --prompt-ids 9707,11,1879")
        turn = Turn(keep=0, tokens=prompt, sampling={"temperature": args.temp}, max_tokens=args.max_tokens)
        stats = GenerationStats()
        watchdog.started = True
        tokens: list[int] = []
        sent = None
        for token in decode(runner, cache, turn, watchdog, stats=stats, logits_out=args.logits_out):
            if not tokens:
                sent = _bytes_sent()  # decoding starts: count from here
            tokens.append(token)
        sent = _bytes_sent() - sent if sent is not None else None
        with watchdog.guard("gathering statistics"):
            mine = mx.array([n_bytes, load_peak, sent or 0, runner.stage.start, runner.stage.stop])
            table = np.array(mx.distributed.all_gather(mine.astype(mx.int64)[None], group=group))
    if rank == 0:
        decoded = stats.generated_tokens - 1
        result = {
            "mode": args.mode, "ranks": group.size(), "tokens": tokens,
            "prompt_tokens": stats.prompt_tokens, "prefill_seconds": round(stats.prompt_seconds, 4),
            "decode_tokens_per_second": round(stats.decode_tps, 2) if stats.decode_seconds else None,
            "bytes_sent_per_token": (round(float(table[:, 2].sum()) / decoded, 1)
                                     if decoded and sent is not None else None),
            "weights_bytes": table[:, 0].tolist(), "load_peak_bytes": table[:, 1].tolist(),
            "layers": [[int(a), int(b)] for a, b in table[:, 3:5]],
        }
        print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qwen_mlx.distributed.runtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="decode token ids over all ranks; rank 0 prints one JSON line")
    g.add_argument("--model", required=True, help="checkpoint directory (the same path on every host)")
    g.add_argument("--mode", choices=MODES, default="pipeline")
    g.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temp", type=float, default=0.0, help="0: greedy")
    g.add_argument("--max-kv-size", type=int, metavar="N", help="rotating KV cache of N tokens (see cache.py)")
    g.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantized KV cache")
    g.add_argument("--kv-group-size", type=int, choices=[32, 64, 128])
    g.add_argument("--backend", default="any", help="mx.distributed backend: any, ring, jaccl, mpi")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one exchange between ranks may take before every rank stops (default 60)")
    g.add_argument("--logits-out", type=Path, help="the sampling rank saves the prompt's logits here (.npy)")
    args = ap.parse_args(argv)
    _generate_cmd(args)


if __name__ == "__main__":
    main()
