"""Decode throughput of the server's scheduler: N concurrent greedy streams against one, on random weights with a
real model's shape (no download, no HTTP: the scheduler that `qwen-mlx serve` runs, fed directly).

    python scripts/bench_serve.py --preset qwen3-0.6b --layers 4 --bits 4 --streams 1,8 --tokens 64

Each case admits N sequences with different random prompts and times the decode steps in which all N decode
together (sampling and evaluation included; the prefills of the ramp are not in them); tokens/s = N x steps / their
seconds, in wall time and in this process's CPU time (on a shared machine the wall time also counts the other
processes' turns). The first case is run once untimed to warm up; the cases run in turn --repeats times and each
case's run with the most tokens per CPU-second is reported. --profile breaks one step of each case into its parts.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.bench.run import PRESETS, preset_config, random_model
from qwen_mlx.cache.kv import make_cache
from qwen_mlx.cli import Parser
from qwen_mlx.engine.batch import decode_logits
from qwen_mlx.engine.generate import greedy
from qwen_mlx.files import write_atomically
from qwen_mlx.flags import number
from qwen_mlx.quant_formats import QUANT_FORMATS
from qwen_mlx.serve.scheduler import ModelForward, Scheduler, Sequence


@dataclass
class Model:
    """What ModelForward needs of api.LLM: the model and its caches."""

    model: object

    def new_cache(self):
        return make_cache(self.model.config)


@dataclass
class NoEos:
    eos_ids: tuple = ()  # random weights: never stop early, every stream generates all its tokens


def run(model, streams: int, prompt_tokens: int, tokens: int, seed: int) -> dict:
    """Decode tokens/s over the steps in which all `streams` sequences decode together (the steady state: the
    ramp, while the others are still being prefilled one by one, is left out)."""
    rng = np.random.default_rng(seed)
    scheduler = Scheduler(ModelForward(Model(model)), NoEos(), max_batch=streams, prefix_cache_bytes=0)
    failed = []  # a failed step ends its sequences early: the figures would be wrong, so it is raised here
    scheduler.on_error = failed.append
    steps = []  # (batch size, seconds, CPU seconds) of each decode step, sampling and evaluation included

    def timed(batch, decode=scheduler._decode):
        start, cpu = time.perf_counter(), time.process_time()
        decode(batch)
        steps.append((len(batch), time.perf_counter() - start, time.process_time() - cpu))

    scheduler._decode = timed
    prompts = [rng.integers(0, model.config.vocab_size, prompt_tokens).tolist() for _ in range(streams)]
    seqs = [scheduler.submit(Sequence(p, greedy, tokens)) for p in prompts]
    scheduler.start()
    for seq in seqs:
        while seq.out.get() is not None:
            pass
    scheduler.close()
    if failed:
        raise failed[0]
    full = [seconds for size, seconds, _ in steps if size == streams]
    cpu = sum(c for size, _, c in steps if size == streams)
    return {"streams": streams, "full_steps": len(full), "seconds": round(sum(full), 3),
            "tokens_per_second": round(streams * len(full) / sum(full), 2),
            "tokens_per_cpu_second": round(streams * len(full) / cpu, 2),
            "step_seconds": round(sum(full) / len(full), 3), "step_cpu_seconds": round(cpu / len(full), 3)}


def _cpu(fn) -> float:
    """The CPU time (this process's, all its threads) of one call of fn, which evaluates what it computes: on a
    shared machine the wall time also counts the other processes' turns."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def profile(model, counts: list[int], prompt_tokens: int, repeats: int, seed: int) -> list[dict]:
    """Where one decode step of N sequences spends its CPU time, for each N in `counts`, each part measured on its
    own: the whole step as the scheduler runs it (forward, sampling, evaluation); the forward alone
    (engine.batch.decode_logits); the forward with every quantized matmul replaced by zeros of its output's shape
    ("rest": embedding, norms, RoPE, attention over the caches, the SwiGLU, the batching's splits and
    concatenations); every quantized matmul of the model on its own with N rows (mx.quantized_matmul on the layer's
    weights), summed by kind; and the scheduler's own work (the step with a forward that returns ready logits:
    sampling each row, the history, the hand-out). The counts are measured in turn, `repeats` rounds, and each
    part's least time is kept, so that every count sees the same machine."""
    rng = np.random.default_rng(seed)
    forward = ModelForward(Model(model))
    cases = []
    for n in counts:
        scheduler = Scheduler(forward, NoEos(), max_batch=n, prefix_cache_bytes=0)
        seqs = []
        for _ in range(n):
            seq = Sequence(rng.integers(0, model.config.vocab_size, prompt_tokens).tolist(), greedy, 10 ** 6)
            scheduler._admit(seq)
            forward.prefill(seq._todo, seq.cache)
            seqs.append(seq)
        mx.eval([s.cache[0].state for s in seqs])
        step = lambda seqs=seqs: decode_logits(model, [s._last for s in seqs], [s.cache for s in seqs])
        ready = Scheduler(Ready(step()), NoEos(), max_batch=n)
        mx.eval(ready.forward.logits)
        layers = [(name, layer, mx.random.normal((n, layer.weight.shape[1] * 32 // layer.bits)).astype(
            layer.scales.dtype)) for name, layer in model.named_modules() if hasattr(layer, "scales")]
        mx.eval([x for _, _, x in layers])
        cases.append((n, scheduler, seqs, step, ready, layers))
    best: dict[int, dict] = {n: {} for n in counts}

    def keep(n: int, part: str, seconds: float) -> None:
        best[n][part] = min(best[n].get(part, float("inf")), seconds)

    real = mx.quantized_matmul
    zeros = lambda x, w, *args, **kw: mx.zeros((*x.shape[:-1], w.shape[0]), dtype=x.dtype)
    for _ in range(repeats):
        for n, scheduler, seqs, step, ready, layers in cases:
            keep(n, "step", _cpu(lambda: scheduler._decode(seqs)))
            keep(n, "forward", _cpu(lambda: mx.eval(step())))
            mx.quantized_matmul = zeros
            try:
                keep(n, "rest", _cpu(lambda: mx.eval(step())))
            finally:
                mx.quantized_matmul = real
            keep(n, "scheduler", _cpu(lambda: ready._decode(seqs)))
            for name, layer, x in layers:
                kind = name.rsplit(".", 1)[-1] if ".layers." in name else "lm_head" if "embed" in name else name
                keep(n, f"{name} {kind}", _cpu(lambda: mx.eval(mx.quantized_matmul(
                    x, layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits))))
    out = []
    for n in counts:
        matmuls = {}
        for key, seconds in best[n].items():
            if " " in key:
                matmuls[key.split(" ")[1]] = matmuls.get(key.split(" ")[1], 0.0) + seconds
        out.append({"streams": n, "step_cpu_seconds": round(best[n]["step"], 4),
                    "forward_cpu_seconds": round(best[n]["forward"], 4), "rest_cpu_seconds": round(best[n]["rest"], 4),
                    "matmul_cpu_seconds": round(sum(matmuls.values()), 4),
                    "scheduler_cpu_seconds": round(best[n]["scheduler"], 4),
                    "matmuls": {k: round(v, 4) for k, v in matmuls.items()}})
    return out


@dataclass
class Ready:
    """A Forward whose decode costs nothing: it returns the logits it was given."""

    logits: mx.array

    def decode(self, tokens, caches):
        return self.logits


def stream_counts(text: str) -> list[int]:
    """--streams: comma-separated counts, each at least 1."""
    try:
        return [number(int, low=1)(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts like 1,8, got {text!r}") from None


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="qwen3-0.6b")
    parser.add_argument("--layers", type=number(int, low=1), default=4)
    parser.add_argument("--bits", choices=["bf16", *map(str, QUANT_FORMATS["affine"][0])], default="4")
    parser.add_argument("--streams", type=stream_counts, default=[1, 8], metavar="LIST",
                        help="the stream counts compared, e.g. 1,8 (the first is the base of the ratios)")
    parser.add_argument("--prompt-tokens", type=number(int, low=1), default=32)
    parser.add_argument("--tokens", type=number(int, low=1), default=64,
                        help="tokens each stream generates, at least the largest --streams count")
    parser.add_argument("--repeats", type=number(int, low=1), default=3)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="activations, norms and quantization scales (MLX's CPU quantized matmul is far slower "
                             "in bfloat16 than in float32)")
    parser.add_argument("--seed", type=number(int, low=0, high=2**32 - 1), default=0)
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--profile", action="store_true",
                        help="also break one decode step of each stream count into matmuls, the rest of the "
                             "forward and the scheduler's own work")
    args = parser.parse_args()
    counts = args.streams
    # The n-th stream joins at decode step n: then the n streams decode together tokens - n + 1 times.
    if args.tokens < max(counts):
        parser.error(f"argument --tokens: must be at least the largest --streams count ({max(counts)}), "
                     f"got {args.tokens}")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"argument --json: no such directory: {args.json.parent}")
    mx.random.seed(args.seed)
    model = random_model(preset_config(args.preset, args.layers), args.bits)
    model.set_dtype(getattr(mx, args.dtype))  # quantized weights stay packed uint32
    mx.eval(model.parameters())
    run(model, counts[0], args.prompt_tokens, min(args.tokens, max(8, counts[0])), args.seed)  # warm-up
    runs = {n: [] for n in counts}
    for r in range(args.repeats):  # the counts in turn, so that each sees the same machine
        for n in counts:
            runs[n].append(run(model, n, args.prompt_tokens, args.tokens, args.seed + r))
    results = []
    for n in counts:
        best = max(runs[n], key=lambda r: r["tokens_per_cpu_second"])  # the least disturbed by other processes
        results.append(best)
        print(f"{n:3d} streams: {best['tokens_per_second']:8.2f} tok/s, {best['tokens_per_cpu_second']:8.2f} tok/CPU-s "
              f"({best['full_steps']} steps of {n} tokens, {best['step_seconds']} s, {best['step_cpu_seconds']} CPU-s "
              "each)", flush=True)
    profiles = profile(model, counts, args.prompt_tokens, args.repeats, args.seed) if args.profile else []
    for p in profiles:
        print(f"{p['streams']:3d} streams, CPU-seconds of one step: {p['step_cpu_seconds']:.3f} (the forward alone "
              f"{p['forward_cpu_seconds']:.3f}, of which not matmuls {p['rest_cpu_seconds']:.3f}; the scheduler's own "
              f"work {p['scheduler_cpu_seconds']:.3f}); each quantized matmul alone: "
              + ", ".join(f"{k} {v:.3f}" for k, v in p["matmuls"].items())
              + f" (sum {p['matmul_cpu_seconds']:.3f})", flush=True)
    base = results[0]["tokens_per_second"]
    for r in results[1:]:
        print(f"{r['streams']} streams / {results[0]['streams']}: {r['tokens_per_second'] / base:.2f}x tokens/s, "
              f"{r['tokens_per_cpu_second'] / results[0]['tokens_per_cpu_second']:.2f}x tokens per CPU-second")
    if args.json is not None:
        report = {"preset": args.preset, "layers": args.layers, "bits": args.bits, "dtype": args.dtype,
                  "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "device": str(mx.default_device()),
                  "machine": platform.processor() or platform.machine(), "results": results, "profiles": profiles}
        write_atomically(args.json, json.dumps(report, indent=1).encode())


if __name__ == "__main__":
    main()
