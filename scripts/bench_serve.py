"""Decode throughput of the server's scheduler: N concurrent greedy streams against one, on random weights with a
real model's shape (no download, no HTTP: the scheduler that `qwen-mlx serve` runs, fed directly).

    python scripts/bench_serve.py --preset qwen3-0.6b --layers 4 --bits 4 --streams 1,8 --tokens 64

Each case admits N sequences with different random prompts and times the decode steps in which all N decode
together (sampling and evaluation included; the prefills of the ramp are not in them); tokens/s = N x steps / their
seconds. The first case is run once untimed to warm up; each case's median of --repeats runs is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from qwen_mlx.bench.run import preset_config, random_model
from qwen_mlx.cache.kv import make_cache
from qwen_mlx.engine.generate import greedy
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
    steps = []  # (batch size, seconds) of each decode step, sampling and evaluation included

    def timed(batch, decode=scheduler._decode):
        start = time.perf_counter()
        decode(batch)
        steps.append((len(batch), time.perf_counter() - start))

    scheduler._decode = timed
    prompts = [rng.integers(0, 151643, prompt_tokens).tolist() for _ in range(streams)]
    seqs = [scheduler.submit(Sequence(p, greedy, tokens)) for p in prompts]
    scheduler.start()
    for seq in seqs:
        while seq.out.get() is not None:
            pass
    scheduler.close()
    full = [seconds for size, seconds in steps if size == streams]
    return {"streams": streams, "full_steps": len(full), "seconds": round(sum(full), 3),
            "tokens_per_second": round(streams * len(full) / sum(full), 2),
            "step_seconds": round(sum(full) / len(full), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bits", default="4")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="activations, norms and quantization scales (MLX's CPU quantized matmul is far slower "
                             "in bfloat16 than in float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    mx.random.seed(args.seed)
    model = random_model(preset_config(args.preset, args.layers), args.bits)
    model.set_dtype(getattr(mx, args.dtype))  # quantized weights stay packed uint32
    mx.eval(model.parameters())
    counts = [int(n) for n in args.streams.split(",")]
    run(model, counts[0], args.prompt_tokens, 8, args.seed)  # warm-up
    results = []
    for n in counts:
        runs = [run(model, n, args.prompt_tokens, args.tokens, args.seed + r) for r in range(args.repeats)]
        best = sorted(runs, key=lambda r: r["tokens_per_second"])[len(runs) // 2]  # the median
        results.append(best)
        print(f"{n:3d} streams: {best['tokens_per_second']:8.2f} tok/s ({best['full_steps']} steps of {n} tokens, "
              f"{best['step_seconds']} s each)", flush=True)
    base = results[0]["tokens_per_second"]
    for r in results[1:]:
        print(f"{r['streams']} streams / {results[0]['streams']}: {r['tokens_per_second'] / base:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "layers": args.layers, "bits": args.bits, "dtype": args.dtype,
                       "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "device":
                       str(mx.default_device()), "machine": platform.processor() or platform.machine(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
