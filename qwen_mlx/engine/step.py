"""The compiled decode step: one token through the whole model as one `mx.compile`d function.

Building a step's graph op by op in Python costs about as much as running a small model's step (see
docs/bench.md, `bench --overhead`); a compiled step traces the model once and then replays the trace in C++ with
its elementwise chains fused. A trace bakes in every Python value it sees, so what changes from token to token
travels as arrays: the position, the slot the token is written to, and the rotating window's bounds (one int32
vector, the same for every layer), and the caches' whole storage buffers, written at an array slot and masked
rather than sliced (cache.store.StepView). Attention reads the first `reach` slots, the slots written rounded up to a
power of two (at least 64) within the buffer: on a CPU, attending over a mostly empty 256-slot buffer costs more than
the compile saves. The buffers grow by 256 tokens at a time, so each (buffer size, reach) pair is traced once per
model and kept with it (a model's traces hold its weights as constants: change them only before the first step).

The eager path (generate.logits_last over the caches) is the reference, and where a compiled step cannot apply it
is what runs: a first token into an empty cache, caches that are not all of one kind in one state (a hand-built
mixture), caches of other classes (a distributed rank's forward), and more than one token at a time (prefill).
Samplers run after the step, eagerly, on its logits: every sampler and its state (random key, history) behaves as
before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import mlx.core as mx

from qwen_mlx.cache.kv import KVCache, LayerCache, QuantizedKVCache, RotatingKVCache
from qwen_mlx.cache.store import StepView
from qwen_mlx.models.qwen3 import Cache, Model

# token (1,), [position, slot, lo, used] (4,) int32, every layer's storage -> (logits (1, vocab) float32, storage)
Traced = Callable[[mx.array, mx.array, list[list[mx.array]]], tuple[mx.array, list[list[mx.array]]]]

MIN_REACH = 64  # the fewest slots a step attends over
STEPPED = (KVCache, QuantizedKVCache, RotatingKVCache)  # the cache kinds a compiled step writes into

_traces: dict[int, dict[tuple, Traced]] = {}  # id(model) -> (cache settings, reach) -> compiled step


def compiled_forward(model: Model, cache: list[Cache]) -> Callable[[mx.array], mx.array | None]:
    """A forward for one decode token: token (1,) -> the float32 logits (1, vocab), the token run into `cache`,
    through one compiled function; or None, having done nothing, where the compiled step does not apply (the
    caller then runs the eager forward)."""
    traces = _model_traces(model)

    def forward(token: mx.array) -> mx.array | None:
        if token.size != 1 or not cache or not all(isinstance(c, STEPPED) for c in cache):
            return None
        plans = [c.plan_step() for c in cache]
        if plans[0] is None or any(plan != plans[0] for plan in plans[1:]):
            return None
        settings, where = plans[0]
        size, used = settings[-1], where[3]
        key = (*settings, min(size, max(MIN_REACH, 1 << (used - 1).bit_length())))
        if key not in traces:
            empty = type(cache[0]).from_state([], cache[0].meta_state)  # the settings, no storage
            traces[key] = mx.compile(_trace(weakref.ref(model), empty, key[-1]))
        logits, buffers = traces[key](token, mx.array(where, dtype=mx.int32), [c.buffers for c in cache])
        for c, b in zip(cache, buffers):
            c.finish_step(b)
        return logits

    return forward


def _model_traces(model: Model) -> dict[tuple, Traced]:
    """The compiled steps of `model`, kept while it lives."""
    key = id(model)
    if key not in _traces:
        _traces[key] = {}
        weakref.finalize(model, _traces.pop, key, None)
    return _traces[key]


def _trace(model: weakref.ref, kind: LayerCache, reach: int) -> Traced:
    """The function a compiled step traces, for caches of `kind`'s settings, attending over `reach` slots. It holds
    the model weakly and no cache: a trace kept with the model holds neither alive."""

    def step(token: mx.array, where: mx.array, buffers: list[list[mx.array]]):
        mask = kind.step_mask(reach, where)  # one window for every layer: (1, reach) bool
        views = [StepView(kind, b, where, mask) for b in buffers]
        h = model().model(token[None], views)  # (1, 1, dim)
        return model().head(h)[:, -1, :].astype(mx.float32), [v.buffers for v in views]

    return step
