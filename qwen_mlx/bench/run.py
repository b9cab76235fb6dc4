"""`qwen-mlx bench`: prefill and decode speed, memory and roofline fraction, side by side with mlx-lm.

Both engines run on the very same weight arrays (shared, not copied; except the experts' gate and up projections,
which ours holds joined and mlx-lm apart), greedy, in one process: ours through `generate_tokens`, mlx-lm through
its own `generate_step`. Each engine's peak memory leaves out the arrays only the other engine holds. Long-context
cases and the rotating-cache run live in bench_context.py, the plot in bench_plot.py. The JSON schema
("qwen-mlx-bench/1") is documented in docs/bench.md; within /1 keys are only ever added, never renamed or removed,
so readers ignore keys they do not know.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen_mlx.cache.kv import make_cache
from qwen_mlx.engine.generate import GenerationStats, generate_tokens
from qwen_mlx.errors import UserError
from qwen_mlx.files import write_atomically
from qwen_mlx.kernels.ops import choose_backend
from qwen_mlx.models.build import build_model
from qwen_mlx.models.config import HYBRID_MODEL_TYPES, ModelConfig
from qwen_mlx.models.fused import fuse
from qwen_mlx.models.qwen3 import checkpoint_weights
from qwen_mlx.weights.memory import Footprint, MemoryPlan, check_fits, kv_cache_bytes
from qwen_mlx.weights.names import mlx_lm_name
from qwen_mlx.weights.quant import quantize_model

_QWEN3 = dict(model_type="qwen3", vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=40960, head_dim=128, attention_bias=False)
_QWEN3_5 = dict(model_type="qwen3_5", vocab_size=248320, rms_norm_eps=1e-6, rope_theta=10000000.0,
                partial_rotary_factor=0.25, max_position_embeddings=262144, head_dim=256, attention_bias=False,
                full_attention_interval=4, linear_num_key_heads=16, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel_dim=4)
PRESETS: dict[str, dict] = {  # dimensions of the real checkpoints' config.json
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, intermediate_size=6144, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=9728, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=12288, tie_word_embeddings=False),
    # Qwen3-0.6B's depth at width 64 with a small vocabulary: the weights are nearly free, so a decode step's time
    # is the per-token overhead (graph building, dispatch) that `bench --overhead` measures.
    "qwen3-deep-thin": dict(_QWEN3, vocab_size=4096, hidden_size=64, num_hidden_layers=28, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, intermediate_size=192, tie_word_embeddings=True),
    "qwen3-30b-a3b": dict(_QWEN3, model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    # The hybrid models (3 Gated DeltaNet layers, then 1 gated attention layer): their released config.json text
    # configs (Qwen/Qwen3.5-4B, -27B, -35B-A3B, Qwen/Qwen3-Next-80B-A3B-Instruct); see docs/bench.md for sources.
    "qwen3.5-4b": dict(_QWEN3_5, hidden_size=2560, num_hidden_layers=32, num_attention_heads=16,
                       num_key_value_heads=4, intermediate_size=9216, linear_num_value_heads=32,
                       tie_word_embeddings=True),
    "qwen3.5-27b": dict(_QWEN3_5, hidden_size=5120, num_hidden_layers=64, num_attention_heads=24,
                        num_key_value_heads=4, intermediate_size=17408, linear_num_value_heads=48,
                        tie_word_embeddings=False),
    "qwen3.5-35b-a3b": dict(_QWEN3_5, model_type="qwen3_5_moe", hidden_size=2048, num_hidden_layers=40,
                            num_attention_heads=16, num_key_value_heads=2, linear_num_value_heads=32,
                            num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                            shared_expert_intermediate_size=512, tie_word_embeddings=False),
    "qwen3-next-80b-a3b": dict(_QWEN3_5, model_type="qwen3_next", vocab_size=151936, hidden_size=2048,
                               num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
                               intermediate_size=5120, linear_num_value_heads=32, num_experts=512,
                               num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                               tie_word_embeddings=False),
}

# Memory bandwidth in GB/s by device name (Apple's and NVIDIA's published figures).
BANDWIDTH_GBS = {
    "Apple M1": 68, "Apple M1 Pro": 200, "Apple M1 Max": 400, "Apple M1 Ultra": 800,
    "Apple M2": 100, "Apple M2 Pro": 200, "Apple M2 Max": 400, "Apple M2 Ultra": 800,
    "Apple M3": 100, "Apple M3 Pro": 150, "Apple M3 Max": 400, "Apple M3 Ultra": 819,
    "Apple M4": 120, "Apple M4 Pro": 273, "Apple M4 Max": 546,
    "NVIDIA H100 80GB HBM3": 3350, "NVIDIA H200": 4800,
}


@dataclass
class Case:
    model: str
    bits: str
    layers: int
    engine: str
    prompt_tokens: int
    gen_tokens: int
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory_bytes: int
    weight_bytes: int
    kv_cache_bytes: int
    weight_bytes_per_token: int
    roofline_fraction: float
    decode_peak_memory_bytes: int  # peak from the first generated token to the last
    memory_limit_bytes: int  # (weights + KV cache) x MEMORY_SLACK
    memory_ok: bool  # decode_peak_memory_bytes <= memory_limit_bytes


MEMORY_SLACK = 1.10  # decode may use at most weights + KV cache + 10%


@dataclass
class Timing:
    """One timed generation."""

    prefill_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory: int  # bytes, whole generation
    decode_peak_memory: int  # bytes, from the first generated token on
    cache_bytes: int  # KV cache at the end


def preset_config(name: str, layers: int | None) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    raw = dict(PRESETS[name])
    if layers:
        raw["num_hidden_layers"] = layers
    return ModelConfig.from_dict(raw, f"preset {name}")


def random_model(cfg: ModelConfig, bits: str, memory: MemoryPlan | None = None) -> nn.Module:
    """A model with random bf16 weights, quantized to `bits` (mlx-lm's affine layout, group 64). With `memory`,
    one that would not fit the GPU's recommended working set is refused before its weights are made."""
    model = build_model(cfg)
    model.set_dtype(mx.bfloat16)
    if bits != "bf16":
        quantize_model(model, {"group_size": 64, "bits": int(bits)})
    fuse(model, choose_backend())
    if memory is not None:  # the arrays are still lazy: their sizes are known, nothing is allocated yet
        weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
        check_fits(f"preset {cfg.model_type} {bits}", Footprint(weights, kv_cache_bytes(cfg, memory, 2)), memory.force)
    mx.eval(model.parameters())
    return model


def mlx_lm_twin(model: nn.Module, cfg: ModelConfig, bits: str) -> nn.Module:
    """mlx-lm's own model class for this config, holding the very same weight arrays; the experts' gate and up,
    which mlx-lm holds apart, as contiguous copies (so that its gathers read them as they would its checkpoint's)."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{MLX_LM_MODULES.get(cfg.model_type, 'qwen3')}")
    raw = cfg.to_dict()
    if cfg.model_type in HYBRID_MODEL_TYPES:  # mlx-lm reads rope from rope_parameters only
        raw["rope_parameters"] = {"type": "default", "rope_theta": cfg.rope_theta,
                                  "partial_rotary_factor": cfg.partial_rotary_factor}
    twin = module.Model(module.ModelArgs.from_dict(raw))
    ours = dict(tree_flatten(model.parameters()))
    weights = {mlx_lm_name(name, cfg.model_type): w if name in ours else mx.contiguous(w)
               for name, w in checkpoint_weights(ours).items()}
    if bits != "bf16":
        nn.quantize(twin, group_size=64, bits=int(bits),
                    class_predicate=lambda path, m: hasattr(m, "to_quantized") and f"{path}.scales" in weights)
    twin.load_weights(list(weights.items()), strict=True)
    mx.eval(twin.parameters())
    twin.eval()
    return twin


# model_type -> mlx-lm's module for it (the rest: mlx_lm.models.qwen3)
MLX_LM_MODULES = {"qwen3_moe": "qwen3_moe", "qwen3_5": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe",
                  "qwen3_next": "qwen3_next"}


def own_bytes(module: nn.Module, other: nn.Module | None) -> int:
    """Bytes of the arrays `module` holds and `other` does not share."""
    shared = {id(p) for _, p in tree_flatten(other.parameters())} if other is not None else set()
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()) if id(p) not in shared)


def weight_bytes_per_token(model: nn.Module, cfg: ModelConfig) -> int:
    """Weight bytes one decode token reads: every matrix once, the routed experts' share of the expert stacks,
    one row of an untied embedding."""
    total = 0
    for name, p in tree_flatten(model.parameters()):
        if name.startswith("model.embed_tokens.") and not cfg.tie_word_embeddings:
            continue
        if ".switch_mlp." in name:
            total += p.nbytes * cfg.num_experts_per_tok // cfg.num_experts
        else:
            total += p.nbytes
    return total


def device_bandwidth(flag: float | None) -> tuple[str, float, str]:
    if mx.metal.is_available():
        name = mx.metal.device_info().get("device_name", "Apple GPU")
    elif mx.cuda.is_available():
        name = "CUDA GPU"
    else:
        name = "CPU"
    if flag:
        return name, flag, "flag"
    if name in BANDWIDTH_GBS:
        return name, float(BANDWIDTH_GBS[name]), "table"
    return name, measure_bandwidth(), "measured"


def measure_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Copy benchmark: GB/s of bytes read plus bytes written by `x + 0` over a large array."""
    x = mx.zeros(n_bytes // 4, mx.float32)
    mx.eval(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(x + 1)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best / 1e9


def time_ours(model: nn.Module, prompt: list[int], gen: int, cache: list | None = None) -> Timing:
    """Generate `gen` tokens after `prompt` through generate_tokens, into `cache` (a fresh one by default)."""
    cache = make_cache(model.config) if cache is None else cache
    stats = GenerationStats()
    first_peak = n = 0
    for n, _ in enumerate(generate_tokens(model, prompt, cache, max_tokens=gen, stats=stats), 1):
        if n == 1:
            first_peak = mx.get_peak_memory()
            mx.reset_peak_memory()
    if n != gen:
        raise RuntimeError(f"generated {n} tokens, expected {gen}")
    decode_peak = mx.get_peak_memory()
    return Timing(stats.prompt_tps, stats.decode_tps, stats.time_to_first_token, max(first_peak, decode_peak),
                  decode_peak, sum(c.nbytes for c in cache))


def time_mlx_lm(twin: nn.Module, prompt: list[int], gen: int, cache: list | None = None) -> Timing:
    """The same through mlx-lm's own generate_step."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(twin) if cache is None else cache
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = last = None
    first_peak = n = 0
    for _token, _ in generate_step(mx.array(prompt), twin, max_tokens=gen, prompt_cache=cache,
                                   sampler=lambda x: mx.argmax(x, axis=-1)):
        last = time.perf_counter()
        n += 1
        if n == 1:
            first = last
            first_peak = mx.get_peak_memory()
            mx.reset_peak_memory()
    ttft = first - start
    decode = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    decode_peak = mx.get_peak_memory()
    return Timing(len(prompt) / ttft, decode, ttft, max(first_peak, decode_peak), decode_peak,
                  sum(c.nbytes for c in cache))


def memory_limit(weight_bytes: int, cache_bytes: int) -> int:
    return int((weight_bytes + cache_bytes) * MEMORY_SLACK)


def run(presets: list[str], bits_list: list[str], prompt_lengths: list[int], gen_tokens: int, *,
        layers: int | None = None, repeats: int = 3, warmup: int = 1, with_mlx_lm: bool = True,
        bandwidth: float | None = None, seed: int = 0, force: bool = False, log=print) -> dict:
    """Prompt-length cases: prefill and decode speed, memory. Returns the JSON document. A model whose weights and
    KV cache exceed the GPU's recommended working set is refused unless `force`."""
    device, gbs, source = device_bandwidth(bandwidth)
    memory = MemoryPlan(context=max(prompt_lengths) + gen_tokens, force=force)
    log(f"device {device}, bandwidth {gbs:.0f} GB/s ({source})")
    log(HEADER)
    cases: list[Case] = []
    for name, bits, model, twin in models(presets, bits_list, layers, with_mlx_lm, seed, memory):
        cfg = model.config
        engines = {"qwen-mlx": lambda p, g, m=model: time_ours(m, p, g)}
        other = {"qwen-mlx": own_bytes(twin, model) if twin is not None else 0}  # held only by the other engine
        if twin is not None:
            engines["mlx-lm"] = lambda p, g, t=twin: time_mlx_lm(t, p, g)
            other["mlx-lm"] = own_bytes(model, twin)
        weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
        per_token = weight_bytes_per_token(model, cfg)
        for plen in prompt_lengths:
            prompt = mx.random.randint(0, cfg.vocab_size, (plen,), key=mx.random.key(seed)).tolist()
            for _ in range(warmup):
                for timer in engines.values():
                    timer(prompt, min(gen_tokens, 8))
            # Engines alternate within each repeat, so a change in machine load hits both alike.
            runs = {engine: [] for engine in engines}
            for _ in range(repeats):
                for engine, timer in engines.items():
                    runs[engine].append(timer(prompt, gen_tokens))
            for engine, results in runs.items():
                decode = statistics.median(r.decode_tps for r in results)
                cache_bytes = max(r.cache_bytes for r in results)
                decode_peak = max(r.decode_peak_memory for r in results) - other[engine]
                limit = memory_limit(weights, cache_bytes)
                case = Case(name, bits, cfg.num_hidden_layers, engine, plen, gen_tokens,
                            statistics.median(r.prefill_tps for r in results), decode,
                            statistics.median(r.ttft_s for r in results),
                            max(r.peak_memory for r in results) - other[engine],
                            weights, cache_bytes, per_token, per_token * decode / (gbs * 1e9),
                            decode_peak, limit, decode_peak <= limit)
                cases.append(case)
                log(_row(case))
        del model, twin, engines
        mx.clear_cache()
    return document(device, gbs, source, with_mlx_lm, cases=[asdict(c) for c in cases], ratios=_ratios(cases))


def document(device: str, gbs: float, source: str, with_mlx_lm: bool, **parts) -> dict:
    """The JSON document: header keys, then every part (empty when a mode did not run)."""
    doc = {"schema": "qwen-mlx-bench/1", "device": device, "bandwidth_gbs": gbs, "bandwidth_source": source,
           "mlx_version": mx.__version__, "mlx_lm_version": _mlx_lm_version() if with_mlx_lm else None,
           "cases": [], "ratios": [], "context_cases": [], "context_ratios": [], "rotating_run": None,
           "overhead_cases": [], "overhead_ratios": []}
    doc.update(parts)
    return doc


def models(sources: list[str], bits_list: list[str], layers: int | None, with_mlx_lm: bool, seed: int,
           memory: MemoryPlan | None = None):
    """(name, bits, our model, mlx-lm's model or None) for each preset x bits, or each checkpoint path. With
    `memory`, each is checked against the GPU's working set first (counting our copy of a checkpoint's weights;
    mlx-lm loads a second one)."""
    for source in sources:
        if source not in PRESETS:  # a checkpoint: its own weights and quantization; mlx-lm loads its own copy
            from qwen_mlx.weights.loader import load_model

            model, path = load_model(source, memory=memory)
            quant = model.config.quantization
            twin = None
            if with_mlx_lm:
                from mlx_lm.utils import load_model as mlx_lm_load

                twin = mlx_lm_load(path)[0]
            yield Path(source).name, str(quant["bits"]) if quant else "bf16", model, twin
            continue
        cfg = preset_config(source, layers)
        for bits in bits_list:
            mx.random.seed(seed)
            model = random_model(cfg, bits, memory)
            yield source, bits, model, mlx_lm_twin(model, cfg, bits) if with_mlx_lm else None


def _ratios(cases: list[Case]) -> list[dict]:
    by_key = {(c.model, c.bits, c.prompt_tokens, c.engine): c for c in cases}
    out = []
    for (model, bits, plen, engine), ours in by_key.items():
        theirs = by_key.get((model, bits, plen, "mlx-lm"))
        if engine == "qwen-mlx" and theirs:
            out.append({"model": model, "bits": bits, "prompt_tokens": plen,
                        "decode_ratio": ours.decode_tps / theirs.decode_tps if theirs.decode_tps else 0.0,
                        "prefill_ratio": ours.prefill_tps / theirs.prefill_tps if theirs.prefill_tps else 0.0})
    return out


def _mlx_lm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("mlx-lm")
    except Exception:  # not installed: the comparison columns are simply absent
        return None


HEADER = (f"{'model':<14} {'bits':>4} {'layers':>6} {'engine':<9} {'prompt':>6} {'prefill tok/s':>13} "
          f"{'decode tok/s':>12} {'ttft s':>7} {'peak MiB':>9} {'roofline':>8}  memory check")


def _row(c: Case) -> str:
    return (f"{c.model:<14} {c.bits:>4} {c.layers:>6} {c.engine:<9} {c.prompt_tokens:>6} {c.prefill_tps:>13.1f} "
            f"{c.decode_tps:>12.1f} {c.ttft_s:>7.3f} {c.peak_memory_bytes / 2**20:>9.0f} "
            f"{100 * c.roofline_fraction:>7.1f}%  "
            f"{memory_check(c.weight_bytes, c.kv_cache_bytes, c.decode_peak_memory_bytes)}")


def memory_check(weights: int, cache: int, decode_peak: int) -> str:
    """'ok' or 'OVER' (the limit is weights + KV cache + 10%), with the decode peak's excess over weights + KV
    cache, e.g. 'ok +2.6% (1166 / 1137 MiB)'."""
    ok = decode_peak <= memory_limit(weights, cache)
    excess = decode_peak / (weights + cache) - 1
    return (f"{'ok' if ok else 'OVER'} {100 * excess:+.1f}% "
            f"({decode_peak / 2**20:.0f} / {(weights + cache) / 2**20:.0f} MiB)")


def format_ratios(result: dict) -> str:
    lines = [f"{'model':<14} {'bits':>4} {'prompt':>6} {'decode ours/mlx-lm':>19} {'prefill ours/mlx-lm':>20}"]
    for r in result["ratios"]:
        lines.append(f"{r['model']:<14} {r['bits']:>4} {r['prompt_tokens']:>6} {r['decode_ratio']:>18.2f}x "
                     f"{r['prefill_ratio']:>19.2f}x")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    write_atomically(path, json.dumps(result, indent=2).encode())
