"""`qwen-mlx bench --draft ...`: speculative decoding against plain decoding, and against mlx-lm's
speculative_generate_step on the same weights.

Two kinds of draft:
- "oracle": proposes the target's own greedy continuation (known from a plain run first), so every drafted token
  is accepted. It costs nothing to run, so it measures what the machinery gives and costs at full acceptance:
  tokens per target forward = k + 1, and the speed-up left after verification and bookkeeping.
- a preset name: a random-weight draft model of that shape (same vocabulary). Random weights agree with the
  target almost never, so this measures the cost of a draft that does not pay, side by side with mlx-lm's own
  speculative loop on the same target and draft weights.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np

from qwen_mlx.bench.run import mlx_lm_twin, preset_config, random_model, time_ours
from qwen_mlx.cache.kv import make_cache
from qwen_mlx.engine.generate import GenerationStats
from qwen_mlx.engine.sampling import SamplingParams
from qwen_mlx.engine.speculative import DraftLength, DraftModel, speculative_tokens
from qwen_mlx.errors import UserError


class OracleDraft:
    """Proposes the target's own greedy continuation (bench only: it needs the answer in advance)."""

    wants_hidden = False

    def __init__(self, continuation: list[int]):
        self.continuation = continuation

    def follow(self, cache) -> None:
        pass

    def sync(self, tokens: list[int]) -> None:
        self.start = len(tokens) + 1

    def propose(self, seen, history, k, params, rng):
        at = len(seen) - self.start
        return [self.continuation[j] if j < len(self.continuation) else 0 for j in range(at, at + k)], None

    def accepted(self, seen, hidden) -> None:
        pass


def _time_speculative(model, draft, prompt: list[int], gen: int, k: int) -> tuple[float, float, float]:
    """(decode tok/s, tokens per target forward, acceptance) of one greedy speculative run."""
    stats = GenerationStats()
    n = sum(1 for _ in speculative_tokens(model, draft, prompt, make_cache(model.config), SamplingParams(),
                                          max_tokens=gen, length=DraftLength(fixed=k), stats=stats))
    if n != gen:
        raise RuntimeError(f"generated {n} tokens, expected {gen}")
    return stats.decode_tps, stats.tokens_per_forward, stats.acceptance


def _time_mlx_lm(twin, draft_twin, prompt: list[int], gen: int, k: int) -> float:
    from mlx_lm.generate import speculative_generate_step

    first = last = None
    n = 0
    for _token, _, _ in speculative_generate_step(mx.array(prompt), twin, draft_twin, num_draft_tokens=k,
                                                  max_tokens=gen, sampler=lambda x: mx.argmax(x, axis=-1)):
        last = time.perf_counter()
        n += 1
        if n == 1:
            first = last
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


def run(preset: str, layers: int | None, bits: str, draft: str, k: int, *, prompt_tokens: int = 64,
        gen_tokens: int = 64, repeats: int = 3, with_mlx_lm: bool = True, seed: int = 0, log=print) -> dict:
    """Median decode tok/s of plain, speculative (and mlx-lm's speculative, for a draft model) runs."""
    cfg = preset_config(preset, layers)
    model = random_model(cfg, bits)
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, prompt_tokens).tolist()
    continuation = [t for t in _plain_tokens(model, prompt, gen_tokens)]
    draft_model = None if draft == "oracle" else random_model(preset_config(draft, None), bits)
    if draft_model is not None and draft_model.config.vocab_size != cfg.vocab_size:
        raise UserError(f"draft preset {draft} has another vocabulary than {preset}")
    twins = (mlx_lm_twin(model, cfg, bits), mlx_lm_twin(draft_model, draft_model.config, bits)) \
        if with_mlx_lm and draft_model is not None else None

    def draft_source():
        return OracleDraft(continuation) if draft_model is None else DraftModel(draft_model)

    plain, spec, per_forward, acceptance, theirs = [], [], [], [], []
    for repeat in range(repeats + 1):  # the first round warms up and is not counted
        p = time_ours(model, prompt, gen_tokens).decode_tps
        s, f, a = _time_speculative(model, draft_source(), prompt, gen_tokens, k)
        t = _time_mlx_lm(*twins, prompt, gen_tokens, k) if twins else None
        if repeat:
            plain.append(p)
            spec.append(s)
            per_forward.append(f)
            acceptance.append(a)
            if t is not None:
                theirs.append(t)
        log(f"  run {repeat}{' (warm-up)' if not repeat else ''}: plain {p:.2f} tok/s, speculative {s:.2f} tok/s "
            f"({f:.2f} tokens per forward, acceptance {a:.0%})" + (f", mlx-lm speculative {t:.2f} tok/s" if t else ""))
    result = {"preset": preset, "layers": layers, "bits": bits, "draft": draft, "draft_tokens": k,
              "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats,
              "plain_tps": statistics.median(plain), "speculative_tps": statistics.median(spec),
              "tokens_per_forward": statistics.median(per_forward), "acceptance": statistics.median(acceptance)}
    result["speedup"] = result["speculative_tps"] / result["plain_tps"]
    if theirs:
        result["mlx_lm_speculative_tps"] = statistics.median(theirs)
        result["vs_mlx_lm"] = result["speculative_tps"] / result["mlx_lm_speculative_tps"]
    return result


def _plain_tokens(model, prompt: list[int], gen: int) -> list[int]:
    from qwen_mlx.engine.generate import generate_tokens

    return list(generate_tokens(model, prompt, make_cache(model.config), max_tokens=gen))


def format_result(r: dict) -> str:
    line = (f"{r['preset']} ({r['layers'] or 'all'} layers, {r['bits']}-bit), draft {r['draft']}, k = "
            f"{r['draft_tokens']}: plain {r['plain_tps']:.2f} tok/s, speculative {r['speculative_tps']:.2f} tok/s "
            f"(x{r['speedup']:.2f}; {r['tokens_per_forward']:.2f} tokens per target forward, acceptance "
            f"{r['acceptance']:.0%})")
    if "mlx_lm_speculative_tps" in r:
        line += f"; mlx-lm speculative {r['mlx_lm_speculative_tps']:.2f} tok/s (ours x{r['vs_mlx_lm']:.2f})"
    return line
