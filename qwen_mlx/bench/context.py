"""Long-context decode speed for each KV cache kind, ours and mlx-lm; memory over a long rotating-cache run.

A 32k-token context is not built by prefill (on a CPU that takes hours for a 0.6B model): every layer's cache is
filled directly with the same random K/V for both engines (a block of 256 random tokens repeated, so that building
it is cheap), then one token is fed and `gen` tokens are decoded. Decode speed does not depend on the values, only
on how many keys are held and how they are stored.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen_mlx.bench.run import (
    Timing,
    device_bandwidth,
    document,
    memory_check,
    memory_limit,
    models,
    time_mlx_lm,
    time_ours,
    weight_bytes_per_token,
)
from qwen_mlx.cache.kv import make_cache
from qwen_mlx.engine.generate import GenerationStats, generate_tokens
from qwen_mlx.errors import UserError
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.qwen3 import Model
from qwen_mlx.weights.memory import MemoryPlan

# cache kind -> (rotating, KV bits)
CACHE_KINDS = {"plain": (False, None), "rotating": (True, None), "kv8": (False, 8), "kv4": (False, 4),
               "rotating-kv8": (True, 8), "rotating-kv4": (True, 4)}
DEFAULT_KINDS = ["plain", "rotating", "kv8", "kv4", "rotating-kv4"]
KEEP = 4  # pinned tokens of the rotating caches (mlx-lm's make_prompt_cache uses 4 too)
CONTEXT_SOURCE = "random-kv"  # how the context was built (recorded in the JSON)
_BLOCK = 256  # tokens of distinct random K/V, repeated to the context length


@dataclass
class ContextCase:
    model: str
    bits: str
    layers: int
    engine: str
    cache: str  # a CACHE_KINDS key
    max_kv_size: int | None  # the rotating caches' window
    kv_bits: int | None
    context_tokens: int  # tokens held before decoding starts
    context_source: str  # CONTEXT_SOURCE
    gen_tokens: int
    decode_tps: float
    ttft_s: float
    peak_memory_bytes: int
    decode_peak_memory_bytes: int
    weight_bytes: int
    kv_cache_bytes: int
    bytes_per_token: int  # weights read per token + the whole KV cache storage
    roofline_fraction: float
    memory_limit_bytes: int
    memory_ok: bool


def random_kv(cfg: ModelConfig, layer: int, n: int, seed: int) -> tuple[mx.array, mx.array]:
    """Keys and values (1, n_kv, n, head_dim) bf16 for one layer: a block of random tokens, repeated."""
    shape = (1, cfg.num_key_value_heads, _BLOCK, cfg.head_dim)
    k_key, v_key = mx.random.split(mx.random.key(seed * 1009 + layer))
    reps = (1, 1, -(-n // _BLOCK), 1)
    k = mx.tile(mx.random.normal(shape, mx.bfloat16, key=k_key), reps)[:, :, :n]
    v = mx.tile(mx.random.normal(shape, mx.bfloat16, key=v_key), reps)[:, :, :n]
    return k, v


def filled_cache_ours(cfg: ModelConfig, kind: str, context: int, max_kv_size: int, seed: int) -> list:
    rotating, bits = CACHE_KINDS[kind]
    cache = make_cache(cfg, max_size=max_kv_size if rotating else None, keep=KEEP, bits=bits,
                       group_size=kv_group_size(cfg))
    for i, c in enumerate(cache):
        c.append(*random_kv(cfg, i, context, seed))
        mx.eval(c.state)
    return cache


def filled_cache_mlx_lm(cfg: ModelConfig, kind: str, context: int, max_kv_size: int, seed: int) -> list:
    """mlx-lm's caches holding the same K/V (for a kind that twin_supports)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    rotating, bits = CACHE_KINDS[kind]
    cache = []
    for i in range(cfg.num_hidden_layers):
        k, v = random_kv(cfg, i, context, seed)
        if rotating:
            c = RotatingKVCache(max_size=max_kv_size, keep=KEEP)
            if context > max_kv_size:  # what it holds after `context` tokens: the pinned ones and the newest
                window = lambda x: mx.concatenate([x[:, :, :KEEP], x[:, :, context - (max_kv_size - KEEP):]], 2)
                c.state = (window(k), window(v), context, KEEP, max_kv_size, max_kv_size)
            else:
                c.update_and_fetch(k, v)
        else:
            c = QuantizedKVCache(group_size=kv_group_size(cfg), bits=bits) if bits else KVCache()
            c.update_and_fetch(k, v)
        mx.eval(_arrays(c))
        cache.append(c)
    return cache


def kv_group_size(cfg: ModelConfig) -> int:
    """64 (both engines' default), or 32 for a head_dim that 64 does not divide (tiny test models)."""
    return 64 if cfg.head_dim % 64 == 0 else 32


def twin_supports(kind: str) -> bool:
    """mlx-lm has no rotating cache that is quantized."""
    rotating, bits = CACHE_KINDS[kind]
    return not (rotating and bits)


def _arrays(cache) -> list[mx.array]:
    return [a for _, a in tree_flatten([cache.keys, cache.values])]


def run_context(sources: list[str], bits_list: list[str], contexts: list[int], gen_tokens: int, *,
                kinds: list[str], max_kv_size: int, layers: int | None = None, repeats: int = 3, warmup: int = 1,
                with_mlx_lm: bool = True, bandwidth: float | None = None, seed: int = 0, force: bool = False,
                log=print) -> dict:
    """Decode speed after `context` tokens for each cache kind. Returns the JSON document. A model whose weights and
    KV cache exceed the GPU's recommended working set is refused unless `force`."""
    unknown = [k for k in kinds if k not in CACHE_KINDS]
    if unknown:
        raise UserError(f"unknown cache kind {unknown[0]!r} (--cache; choose from {', '.join(CACHE_KINDS)})")
    device, gbs, source = device_bandwidth(bandwidth)
    log(f"device {device}, bandwidth {gbs:.0f} GB/s ({source}); context built as {CONTEXT_SOURCE}")
    log(CONTEXT_HEADER)
    cases: list[ContextCase] = []
    memory = MemoryPlan(context=max(contexts) + gen_tokens, force=force)
    for name, bits, model, twin in models(sources, bits_list, layers, with_mlx_lm, seed, memory):
        cfg = model.config
        weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
        per_token = weight_bytes_per_token(model, cfg)
        token = [seed % cfg.vocab_size]
        for context in contexts:
            for kind in kinds:
                engines = {"qwen-mlx": lambda g, k=kind, c=context, m=model: time_ours(
                    m, token, g, filled_cache_ours(cfg, k, c, max_kv_size, seed))}
                if twin is not None and twin_supports(kind):
                    engines["mlx-lm"] = lambda g, k=kind, c=context, t=twin: time_mlx_lm(
                        t, token, g, filled_cache_mlx_lm(cfg, k, c, max_kv_size, seed))
                runs = _alternate(engines, gen_tokens, repeats, warmup)
                for engine, results in runs.items():
                    case = _case(name, bits, cfg, engine, kind, max_kv_size, context, gen_tokens, results, weights,
                                 per_token, gbs)
                    cases.append(case)
                    log(_context_row(case))
        del model, twin
        mx.clear_cache()
    return document(device, gbs, source, with_mlx_lm, context_cases=[asdict(c) for c in cases],
                    context_ratios=_context_ratios(cases))


def _alternate(engines: dict, gen: int, repeats: int, warmup: int) -> dict[str, list[Timing]]:
    """Engines alternate within each repeat, so a change in machine load hits both alike."""
    for _ in range(warmup):
        for timer in engines.values():
            timer(min(gen, 3))
    runs = {engine: [] for engine in engines}
    for _ in range(repeats):
        for engine, timer in engines.items():
            runs[engine].append(timer(gen))
            mx.clear_cache()
    return runs


def _case(name, bits, cfg, engine, kind, max_kv_size, context, gen, results: list[Timing], weights, per_token,
          gbs) -> ContextCase:
    rotating, kv_bits = CACHE_KINDS[kind]
    decode = statistics.median(r.decode_tps for r in results)
    cache_bytes = max(r.cache_bytes for r in results)
    decode_peak = max(r.decode_peak_memory for r in results)
    limit = memory_limit(weights, cache_bytes)
    return ContextCase(name, bits, cfg.num_hidden_layers, engine, kind, max_kv_size if rotating else None, kv_bits,
                       context, CONTEXT_SOURCE, gen, decode, statistics.median(r.ttft_s for r in results),
                       max(r.peak_memory for r in results), decode_peak, weights, cache_bytes,
                       per_token + cache_bytes, (per_token + cache_bytes) * decode / (gbs * 1e9), limit,
                       decode_peak <= limit)


def _context_ratios(cases: list[ContextCase]) -> list[dict]:
    """ours / mlx-lm decode speed per (model, bits, cache, context); decode_ratio null where mlx-lm has no such
    cache."""
    theirs = {(c.model, c.bits, c.cache, c.context_tokens): c for c in cases if c.engine == "mlx-lm"}
    out = []
    for c in cases:
        if c.engine != "qwen-mlx":
            continue
        other = theirs.get((c.model, c.bits, c.cache, c.context_tokens))
        ratio = c.decode_tps / other.decode_tps if other and other.decode_tps else None
        out.append({"model": c.model, "bits": c.bits, "cache": c.cache, "context_tokens": c.context_tokens,
                    "decode_ratio": ratio})
    return out


CONTEXT_HEADER = (f"{'model':<14} {'bits':>4} {'layers':>6} {'engine':<9} {'cache':<12} {'context':>7} "
                  f"{'decode tok/s':>12} {'KV MiB':>8} {'peak MiB':>9}  memory check")


def _context_row(c: ContextCase) -> str:
    return (f"{c.model:<14} {c.bits:>4} {c.layers:>6} {c.engine:<9} {c.cache:<12} {c.context_tokens:>7} "
            f"{c.decode_tps:>12.2f} {c.kv_cache_bytes / 2**20:>8.1f} {c.peak_memory_bytes / 2**20:>9.0f}  "
            f"{memory_check(c.weight_bytes, c.kv_cache_bytes, c.decode_peak_memory_bytes)}")


def format_context_ratios(result: dict) -> str:
    lines = [f"{'model':<14} {'bits':>4} {'cache':<12} {'context':>7} {'decode ours/mlx-lm':>19}"]
    for r in result["context_ratios"]:
        ratio = "n/a" if r["decode_ratio"] is None else f"{r['decode_ratio']:.2f}x"
        lines.append(f"{r['model']:<14} {r['bits']:>4} {r['cache']:<12} {r['context_tokens']:>7} {ratio:>19}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- the long rotating run


def rotating_run(model: Model, name: str, bits: str, max_kv_size: int, *, seed: int = 0, log=print) -> dict:
    """Fill the window with a prompt of max_kv_size tokens, then generate 4 x max_kv_size tokens through a
    rotating cache, recording memory after the first token and at each quarter. Memory is flat when, over the four
    quarters, the active memory never grows past the first quarter's by more than 1%, the peaks stay within 1% of
    each other and the cache's bytes do not change. (After the last token the active memory drops a little: no next
    step is being computed.)"""
    cfg = model.config
    prompt = mx.random.randint(0, cfg.vocab_size, (max_kv_size,), key=mx.random.key(seed)).tolist()
    cache = make_cache(cfg, max_size=max_kv_size, keep=KEEP)
    gen = 4 * max_kv_size
    marks = {1, *(q * max_kv_size for q in range(1, 5))}
    samples = []
    stats = GenerationStats()
    mx.reset_peak_memory()
    for n, _ in enumerate(generate_tokens(model, prompt, cache, max_tokens=gen, stats=stats), 1):
        if n in marks:
            sample = {"generated_tokens": n, "active_memory_bytes": mx.get_active_memory(),
                      "peak_memory_bytes": mx.get_peak_memory(), "kv_cache_bytes": sum(c.nbytes for c in cache)}
            samples.append(sample)
            log(f"  {n:>6} tokens: active {sample['active_memory_bytes'] / 2**20:.1f} MiB, peak since last "
                f"{sample['peak_memory_bytes'] / 2**20:.1f} MiB, KV cache {sample['kv_cache_bytes'] / 2**20:.2f} MiB")
            mx.reset_peak_memory()
    quarters = samples[1:]
    active = [s["active_memory_bytes"] for s in quarters]
    peaks = [s["peak_memory_bytes"] for s in quarters]
    flat = (max(active) <= 1.01 * active[0] and max(peaks) <= 1.01 * min(peaks)
            and len({s["kv_cache_bytes"] for s in quarters}) == 1)
    log(f"memory {'flat' if flat else 'NOT flat'} over {gen} generated tokens (window {max_kv_size}), "
        f"{stats.decode_tps:.1f} tok/s")
    return {"model": name, "bits": bits, "layers": cfg.num_hidden_layers, "max_kv_size": max_kv_size, "keep": KEEP,
            "prompt_tokens": len(prompt), "gen_tokens": gen, "decode_tps": stats.decode_tps, "samples": samples,
            "flat": flat}


def run_rotating(sources: list[str], bits_list: list[str], max_kv_size: int, *, layers: int | None = None,
                 bandwidth: float | None = None, seed: int = 0, force: bool = False, log=print) -> dict:
    """The long rotating run for the first model and bits given. Returns the JSON document."""
    device, gbs, source = device_bandwidth(bandwidth)
    memory = MemoryPlan(context=max_kv_size, max_kv_size=max_kv_size, force=force)
    name, bits, model, _ = next(models(sources[:1], bits_list[:1], layers, False, seed, memory))
    log(f"device {device}; {name} {bits}, {model.config.num_hidden_layers} layers: rotating cache, window "
        f"{max_kv_size}, {4 * max_kv_size} tokens generated after a {max_kv_size}-token prompt")
    return document(device, gbs, source, False, rotating_run=rotating_run(model, name, bits, max_kv_size, seed=seed,
                                                                          log=log))


def merge(*docs: dict) -> dict:
    """One JSON document from several modes' documents (the non-empty parts of each)."""
    out = dict(docs[0])
    for doc in docs[1:]:
        for key in ("cases", "ratios", "context_cases", "context_ratios", "overhead_cases", "overhead_ratios"):
            out[key] = out[key] + doc[key]
        out["rotating_run"] = out["rotating_run"] or doc["rotating_run"]
        out["mlx_lm_version"] = out["mlx_lm_version"] or doc["mlx_lm_version"]
    return out
