"""`qwen-mlx bench --overhead`: what a decode token costs beyond the model's arithmetic, ours and mlx-lm's.

Per engine, on the same weights (run.models), three figures:
- decode time per token, through each one's public decode path (ours `generate_tokens`, mlx-lm `generate_step`:
  run.time_ours / run.time_mlx_lm), median over the repeats;
- graph nodes and ops of one decode step: the lazy graph that evaluating the step's outputs (the sampled token and
  every cache array the step updates) would run, counted by MLX's own walk over the inputs with a visited set
  (`mx.export_to_dot`); nodes are the arrays reached (evaluated ones, like the weights, end the walk and count),
  ops the primitives among them;
- graph-build time per token: the time to build one step's graph without evaluating it (median over the steps).

On the deep-thin preset (qwen3-deep-thin: Qwen3-0.6B's 28 layers at width 64, weights nearly free) the decode time
is almost all overhead; on qwen3-0.6b the build time is the host's share of a real model's step.
"""

from __future__ import annotations

import io
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen_mlx.bench.run import device_bandwidth, document, models, time_mlx_lm, time_ours
from qwen_mlx.cache.kv import make_cache
from qwen_mlx.engine.generate import decode_forward, greedy, prefill
from qwen_mlx.models.qwen3 import Model
from qwen_mlx.weights.memory import MemoryPlan

DEFAULT_SOURCES = ["qwen3-deep-thin", "qwen3-0.6b"]

# token (1,) -> (next token (1,), the cache arrays the step updates); builds the step's graph, evaluates nothing
Step = Callable[[mx.array], tuple[mx.array, list[mx.array]]]


@dataclass
class OverheadCase:
    model: str
    bits: str
    layers: int
    engine: str
    prompt_tokens: int
    gen_tokens: int
    decode_ms_per_token: float  # median over the repeats, public decode path
    build_ms_per_token: float  # median time to build one decode step's graph (not evaluated)
    graph_nodes: int  # arrays in one decode step's graph
    graph_ops: int  # primitives in one decode step's graph


def count_graph(*outputs: mx.array) -> tuple[int, int]:
    """(nodes, ops) of the graph that evaluating `outputs` runs: the distinct arrays reached from them through their
    inputs (an evaluated array ends the walk and counts), and the primitives among them (once per primitive, however
    many outputs it has). MLX's own depth-first walk with a visited set (export_to_dot), parsed."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    text = dot.getvalue()
    nodes = set(re.findall(r'^\{ (?:rank=\w+; )?"(\w+)"; \}$', text, re.MULTILINE))
    ops = re.findall(r"^\{ \d+ \[label =.*shape=rectangle\]; \}$", text, re.MULTILINE)
    return len(nodes), len(ops)


def our_step(model: Model, prompt: list[int]) -> tuple[Step, mx.array]:
    """Our decode step as generate_tokens builds it, after `prompt` minus its last token is prefilled into a
    fresh cache; returns the step and that last token (1,)."""
    cache = make_cache(model.config)
    tokens = mx.array(prompt, dtype=mx.uint32)
    prefill(model, tokens[:-1], cache)
    forward = decode_forward(model, cache)

    def step(token: mx.array) -> tuple[mx.array, list[mx.array]]:
        return greedy(forward(token), tokens), [b for c in cache for b in c.buffers]

    return step, tokens[-1:]


def mlx_lm_step(twin: nn.Module, prompt: list[int]) -> tuple[Step, mx.array]:
    """mlx-lm's decode step as generate_step builds it (its `_step`: model call, last position, log-softmax,
    sampler), after the same prefill."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(twin)
    tokens = mx.array(prompt, dtype=mx.uint32)
    twin(tokens[None, :-1], cache=cache)
    mx.eval([c.state for c in cache])

    def step(token: mx.array) -> tuple[mx.array, list[mx.array]]:
        logits = twin(token[None], cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        held = [a for c in cache for _, a in tree_flatten([c.keys, c.values])]  # not c.state: that slices them
        return mx.argmax(logprobs, axis=-1), held

    return step, tokens[-1:]


def measure_steps(step: Step, token: mx.array, n: int) -> tuple[list[float], tuple[int, int]]:
    """Build and evaluate n steps one at a time from `token`; returns each build's seconds and the first step's
    (nodes, ops)."""
    builds, graph = [], (0, 0)
    for i in range(n):
        start = time.perf_counter()
        token, held = step(token)
        builds.append(time.perf_counter() - start)
        if i == 0:
            graph = count_graph(token, *held)
        mx.eval(token, held)
    return builds, graph


def run_overhead(sources: list[str], bits_list: list[str], prompt_tokens: int, gen_tokens: int, *,
                 layers: int | None = None, repeats: int = 3, warmup: int = 1, with_mlx_lm: bool = True,
                 bandwidth: float | None = None, seed: int = 0, force: bool = False, log=print) -> dict:
    """Decode time, graph size and graph-build time per token for each source x bits; returns the JSON document."""
    device, gbs, source = device_bandwidth(bandwidth)
    memory = MemoryPlan(context=prompt_tokens + gen_tokens, force=force)
    log(f"device {device}; {prompt_tokens}-token prompt, {gen_tokens} tokens per run, {repeats} repeats")
    log(HEADER)
    cases: list[OverheadCase] = []
    for name, bits, model, twin in models(sources, bits_list, layers, with_mlx_lm, seed, memory):
        cfg = model.config
        prompt = mx.random.randint(0, cfg.vocab_size, (prompt_tokens,), key=mx.random.key(seed)).tolist()
        engines = {"qwen-mlx": (lambda g, m=model: time_ours(m, prompt, g), lambda m=model: our_step(m, prompt))}
        if twin is not None:
            engines["mlx-lm"] = (lambda g, t=twin: time_mlx_lm(t, prompt, g), lambda t=twin: mlx_lm_step(t, prompt))
        for _ in range(warmup):
            for timer, make_step in engines.values():
                timer(min(gen_tokens, 8))
                measure_steps(*make_step(), 2)
        # Engines alternate within each repeat, so a change in machine load hits both alike.
        decode = {engine: [] for engine in engines}
        builds = {engine: [] for engine in engines}
        graphs = {}
        for _ in range(repeats):
            for engine, (timer, make_step) in engines.items():
                decode[engine].append(1e3 / timer(gen_tokens).decode_tps)
                seconds, graphs[engine] = measure_steps(*make_step(), gen_tokens)
                builds[engine] += seconds
        for engine in engines:
            case = OverheadCase(name, bits, cfg.num_hidden_layers, engine, prompt_tokens, gen_tokens,
                                statistics.median(decode[engine]), 1e3 * statistics.median(builds[engine]),
                                *graphs[engine])
            cases.append(case)
            log(_row(case))
        del model, twin, engines
        mx.clear_cache()
    return document(device, gbs, source, with_mlx_lm, overhead_cases=[asdict(c) for c in cases],
                    overhead_ratios=_ratios(cases))


def _ratios(cases: list[OverheadCase]) -> list[dict]:
    """Ours over mlx-lm's for each figure (below 1: ours costs less)."""
    by_key = {(c.model, c.bits, c.engine): c for c in cases}
    out = []
    for (model, bits, engine), ours in by_key.items():
        theirs = by_key.get((model, bits, "mlx-lm"))
        if engine == "qwen-mlx" and theirs:
            out.append({"model": model, "bits": bits,
                        "decode_time_ratio": ours.decode_ms_per_token / theirs.decode_ms_per_token,
                        "build_time_ratio": ours.build_ms_per_token / theirs.build_ms_per_token,
                        "graph_nodes_ratio": ours.graph_nodes / theirs.graph_nodes,
                        "graph_ops_ratio": ours.graph_ops / theirs.graph_ops})
    return out


HEADER = (f"{'model':<16} {'bits':>4} {'layers':>6} {'engine':<9} {'decode ms/tok':>13} {'build ms/tok':>12} "
          f"{'graph nodes':>11} {'graph ops':>9}")


def _row(c: OverheadCase) -> str:
    return (f"{c.model:<16} {c.bits:>4} {c.layers:>6} {c.engine:<9} {c.decode_ms_per_token:>13.2f} "
            f"{c.build_ms_per_token:>12.2f} {c.graph_nodes:>11} {c.graph_ops:>9}")


def format_overhead_ratios(result: dict) -> str:
    lines = [f"{'model':<16} {'bits':>4} {'decode time ours/mlx-lm':>24} {'build time ours/mlx-lm':>23} "
             f"{'nodes ours/mlx-lm':>18} {'ops ours/mlx-lm':>16}"]
    for r in result["overhead_ratios"]:
        lines.append(f"{r['model']:<16} {r['bits']:>4} {r['decode_time_ratio']:>23.2f}x "
                     f"{r['build_time_ratio']:>22.2f}x {r['graph_nodes_ratio']:>17.2f}x {r['graph_ops_ratio']:>15.2f}x")
    return "\n".join(lines)
