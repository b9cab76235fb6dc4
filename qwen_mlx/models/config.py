"""Model configuration parsed from a Hugging Face ``config.json``.

Field names are the ``config.json`` keys verbatim, so a reader can hold the two side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.quant_formats import quant_format_problem

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next")
# The hybrid family: Gated DeltaNet (linear attention) layers and gated full-attention layers, as `layer_types` says.
HYBRID_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
# transformers' text-only model types of Qwen3.5 (a ForCausalLM checkpoint) are the same models.
_TEXT_MODEL_TYPES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}
LAYER_TYPES = ("linear_attention", "full_attention")


class ConfigError(UserError, ValueError):
    """A checkpoint's config.json is missing, malformed or describes a model we cannot run."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (the only rope scaling Qwen2.5/Qwen3 checkpoints use)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1, as in the YaRN paper
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str = "bfloat16"
    rope_scaling: RopeScaling | None = None
    # Mixture of experts (qwen3_moe); zero experts means every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # MLX quantization as written by mlx-lm / our convert: {"group_size", "bits", "mode", per-layer overrides}.
    quantization: dict | None = None
    # The hybrid models (qwen3_5, qwen3_5_moe, qwen3_next); empty layer_types: every layer is full attention.
    layer_types: tuple[str, ...] = ()
    partial_rotary_factor: float = 1.0  # RoPE turns the first int(head_dim * factor) dims of each head
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert

    def is_linear_layer(self, layer: int) -> bool:
        """A Gated DeltaNet layer (recurrent state) rather than full attention (KV cache)."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return _parse(raw, str(path))

    def to_dict(self) -> dict:
        """The Hugging Face spelling of this config (what convert writes back to config.json)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "rope_scaling":
                value = None if value is None else {"rope_type": "yarn", **vars(value)}
                if value is not None and value["attention_factor"] is None:
                    del value["attention_factor"]
            elif f.name in ("mlp_only_layers", "layer_types"):
                value = list(value)
            elif f.name == "quantization" and value is None:
                continue
            out[f.name] = value
        if self.num_experts == 0:
            for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                        "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size"):
                out.pop(key)
        if self.model_type not in HYBRID_MODEL_TYPES:
            for key in ("layer_types", "partial_rotary_factor", "linear_num_key_heads", "linear_num_value_heads",
                        "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
                        "shared_expert_intermediate_size"):
                out.pop(key, None)
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        return out


# model_type -> the transformers class a config.json names in "architectures"
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "qwen3_5": "Qwen3_5ForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForCausalLM",
                 "qwen3_next": "Qwen3NextForCausalLM"}


def _parse(raw: dict, source: str) -> ModelConfig:
    raw = _text_config(raw, source)
    model_type = _TEXT_MODEL_TYPES.get(raw.get("model_type"), raw.get("model_type"))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(qwen-mlx runs {', '.join(SUPPORTED_MODEL_TYPES)})"
        )

    def need(key: str, kind: type):
        if key not in raw:
            raise ConfigError(f"{source}: required key {key!r} is missing")
        return _typed(raw[key], kind, key, source)

    def opt(key: str, kind: type, default):
        value = raw.get(key)
        return default if value is None else _typed(value, kind, key, source)

    hidden = need("hidden_size", int)
    heads = need("num_attention_heads", int)
    kv_heads = opt("num_key_value_heads", int, heads)
    for key, value in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if value <= 0:
            raise ConfigError(f"{source}: {key} must be positive, got {value}")
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads ({heads}) is not divisible by num_key_value_heads ({kv_heads})"
        )
    hybrid = model_type in HYBRID_MODEL_TYPES
    # Qwen3 states head_dim explicitly (it is not hidden_size // heads there); Qwen2 derives it. The hybrid
    # models' config classes default it to 256 (transformers), whatever hidden_size // heads is.
    head_dim = opt("head_dim", int, 0) or (256 if hybrid else hidden // heads)
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")

    rope_theta, rope_scaling = _parse_rope(raw, source)
    # transformers 5 writes num_local_experts for what older configs call num_experts.
    num_experts = opt("num_experts", int, 0) or opt("num_local_experts", int, 0)
    if model_type not in ("qwen3_moe", "qwen3_5_moe", "qwen3_next"):
        num_experts = 0
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    mlp_only_layers = tuple(_typed(i, int, "mlp_only_layers", source) for i in raw.get("mlp_only_layers") or ())
    decoder_sparse_step = opt("decoder_sparse_step", int, 1)
    norm_topk_prob = opt("norm_topk_prob", bool, False)
    if model_type == "qwen3_5_moe":
        # transformers' Qwen3.5-MoE has an MoE block in every layer and always renormalizes the top-k weights,
        # whatever these keys say.
        mlp_only_layers, decoder_sparse_step, norm_topk_prob = (), 1, True
    elif model_type == "qwen3_next":
        norm_topk_prob = opt("norm_topk_prob", bool, True)  # Qwen3NextConfig's default

    cfg = ModelConfig(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=need("num_hidden_layers", int),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=need("intermediate_size", int) if num_experts == 0 else opt("intermediate_size", int, 0),
        vocab_size=need("vocab_size", int),
        rms_norm_eps=opt("rms_norm_eps", float, 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=opt("max_position_embeddings", int, 32768),
        # Qwen2's config class defaults tie_word_embeddings to False, Qwen3's too.
        tie_word_embeddings=opt("tie_word_embeddings", bool, False),
        # Qwen2 always has QKV bias (its config has no attention_bias key); Qwen3 has none unless stated.
        attention_bias=True if model_type == "qwen2" else opt("attention_bias", bool, False),
        torch_dtype=str(dtype),
        rope_scaling=rope_scaling,
        num_experts=num_experts,
        num_experts_per_tok=opt("num_experts_per_tok", int, 0),
        moe_intermediate_size=opt("moe_intermediate_size", int, 0),
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=decoder_sparse_step,
        mlp_only_layers=mlp_only_layers,
        quantization=_parse_quantization(raw, source),
        **(_parse_hybrid(raw, source, need("num_hidden_layers", int), head_dim, num_experts) if hybrid else {}),
    )
    if cfg.num_hidden_layers <= 0 or cfg.vocab_size <= 0:
        raise ConfigError(f"{source}: num_hidden_layers and vocab_size must be positive")
    if num_experts:
        if not 0 < cfg.num_experts_per_tok <= num_experts:
            raise ConfigError(
                f"{source}: num_experts_per_tok ({cfg.num_experts_per_tok}) must be between 1 and "
                f"num_experts ({num_experts})"
            )
        if cfg.moe_intermediate_size <= 0:
            raise ConfigError(f"{source}: moe_intermediate_size is required for a {model_type} model")
        if cfg.decoder_sparse_step <= 0:
            raise ConfigError(f"{source}: decoder_sparse_step must be positive")
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) and cfg.intermediate_size <= 0:
        raise ConfigError(f"{source}: intermediate_size is required for the dense MLP layers")
    return cfg


def _text_config(raw: dict, source: str) -> dict:
    """Qwen3.5's image-text config.json holds the language model's keys under `text_config`; the top level's
    model_type names the family, and its tie_word_embeddings is the one transformers applies."""
    text = raw.get("text_config")
    if text is None:
        return raw
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: text_config must be a JSON object")
    top = {k: raw[k] for k in ("model_type", "tie_word_embeddings", "quantization", "quantization_config",
                               "torch_dtype", "dtype") if raw.get(k) is not None}
    return {**text, **top}


def _parse_hybrid(raw: dict, source: str, n_layers: int, head_dim: int, num_experts: int) -> dict:
    """The linear-attention (Gated DeltaNet) and gated-attention keys of qwen3_5 / qwen3_5_moe / qwen3_next."""

    def positive(key: str) -> int:
        if raw.get(key) is None:
            raise ConfigError(f"{source}: required key {key!r} is missing")
        value = _typed(raw[key], int, key, source)
        if value <= 0:
            raise ConfigError(f"{source}: {key} must be positive, got {value}")
        return value

    layer_types = raw.get("layer_types")
    if layer_types is None:  # older configs: every interval-th layer is full attention (transformers' rule)
        interval = _typed(raw.get("full_attention_interval", 4), int, "full_attention_interval", source)
        if interval <= 0:
            raise ConfigError(f"{source}: full_attention_interval must be positive, got {interval}")
        layer_types = [LAYER_TYPES[(i + 1) % interval == 0] for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or any(t not in LAYER_TYPES
                                                                                 for t in layer_types):
        raise ConfigError(f"{source}: layer_types must list one of {' / '.join(LAYER_TYPES)} for each of the "
                          f"{n_layers} layers")
    heads_k, heads_v = positive("linear_num_key_heads"), positive("linear_num_value_heads")
    if heads_v % heads_k:
        raise ConfigError(f"{source}: linear_num_value_heads ({heads_v}) is not a multiple of linear_num_key_heads "
                          f"({heads_k})")
    kernel = positive("linear_conv_kernel_dim")
    if kernel < 2:  # a width-1 convolution's weight (C, 1, 1) would not say which layout it is stored in
        raise ConfigError(f"{source}: linear_conv_kernel_dim must be at least 2, got {kernel}")
    params = raw.get("rope_parameters") or {}
    factor = _typed(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25)), float,
                    "partial_rotary_factor", source)  # 0.25: transformers' default for these models
    if not 0 < factor <= 1 or int(head_dim * factor) % 2 or int(head_dim * factor) == 0:
        raise ConfigError(f"{source}: partial_rotary_factor {factor} must turn an even, non-zero number of the "
                          f"{head_dim} dims of a head")
    shared = _typed(raw.get("shared_expert_intermediate_size") or 0, int, "shared_expert_intermediate_size", source)
    if num_experts and shared <= 0:
        raise ConfigError(f"{source}: shared_expert_intermediate_size is required for this mixture of experts")
    return dict(layer_types=tuple(layer_types), partial_rotary_factor=factor, linear_num_key_heads=heads_k,
                linear_num_value_heads=heads_v, linear_key_head_dim=positive("linear_key_head_dim"),
                linear_value_head_dim=positive("linear_value_head_dim"), linear_conv_kernel_dim=kernel,
                shared_expert_intermediate_size=shared if num_experts else 0)


def _parse_rope(raw: dict, source: str) -> tuple[float, RopeScaling | None]:
    # Hub checkpoints: rope_theta + rope_scaling. transformers 5: rope_parameters {rope_type, rope_theta, ...}.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling / rope_parameters must be JSON objects")
    theta = raw.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{source}: rope_theta is missing (neither rope_theta nor rope_parameters.rope_theta)")
    theta = _typed(theta, float, "rope_theta", source)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("default", None):
        return theta, None
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only default and yarn)")
    factor = _typed(scaling.get("factor"), float, "rope_scaling.factor", source)
    if factor < 1.0:
        raise ConfigError(f"{source}: rope_scaling.factor must be at least 1, got {factor}")
    original = scaling.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    attention_factor = scaling.get("attention_factor")
    return theta, RopeScaling(
        factor=factor,
        original_max_position_embeddings=_typed(original, int, "original_max_position_embeddings", source),
        beta_fast=_typed(scaling.get("beta_fast") or 32, float, "beta_fast", source),
        beta_slow=_typed(scaling.get("beta_slow") or 1, float, "beta_slow", source),
        attention_factor=None if attention_factor is None else _typed(attention_factor, float, "attention_factor",
                                                                      source),
        truncate=bool(scaling.get("truncate", True)),
    )


def _parse_quantization(raw: dict, source: str) -> dict | None:
    quant = raw.get("quantization")
    hf_quant = raw.get("quantization_config")
    if quant is None and isinstance(hf_quant, dict) and "quant_method" not in hf_quant:
        quant = hf_quant  # mlx-lm writes the same section under both names
    if quant is None:
        if isinstance(hf_quant, dict):
            raise ConfigError(
                f"{source}: quantization method {hf_quant.get('quant_method')!r} is not supported "
                "(qwen-mlx loads bf16/fp16/fp32 or MLX-quantized checkpoints; convert with `qwen-mlx convert`)"
            )
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"{source}: quantization must be a JSON object")
    _check_quant_settings(quant, "quantization", source)
    for key, override in quant.items():
        if key in ("group_size", "bits", "mode"):
            continue
        if isinstance(override, dict):  # a layer with its own settings; what it leaves out comes from the defaults
            _check_quant_settings({**quant, **override}, f"quantization[{key!r}]", source)
        elif not isinstance(override, bool):
            raise ConfigError(f"{source}: quantization[{key!r}] must be an object or a boolean, got {override!r}")
    return quant


def _check_quant_settings(settings: dict, key: str, source: str) -> None:
    bits = _typed(settings.get("bits"), int, f"{key}.bits", source)
    group_size = _typed(settings.get("group_size"), int, f"{key}.group_size", source)
    problem = quant_format_problem(settings.get("mode", "affine"), bits, group_size)
    if problem:
        raise ConfigError(f"{source}: unsupported {key} bits={bits} group_size={group_size} ({problem})")


def _typed(value, kind: type, key: str, source: str):
    # bool is an int in Python; a config that says "num_hidden_layers": true is wrong, not 1.
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
    return kind(value)
