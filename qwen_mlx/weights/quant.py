"""Quantization of a Model from outside (the model itself knows nothing of it): the layers of kernels/quantized.py
swapped in by quantize_model, the settings, recipes and quality measures.

The layout is mlx-lm's: `<layer>.weight` packed uint32, `<layer>.scales`, `<layer>.biases`, and config.json's
"quantization" section {"group_size", "bits", "mode"} with per-layer overrides keyed by the layer path
(a dict of its own settings, or false for a layer left unquantized). Paths are the checkpoint's: the model's joined
experts' `gate_up_proj` is the checkpoint's `gate_proj` and `up_proj` (model.checkpoint_names), quantized alike.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from qwen_mlx.errors import UserError
from qwen_mlx.kernels.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedSwitchLinear
from qwen_mlx.models.config import HYBRID_MODEL_TYPES
from qwen_mlx.models.qwen3 import SwitchLinear, SwitchMLP, checkpoint_names
from qwen_mlx.quant_formats import QUANT_FORMATS, quant_format_problem


def layer_settings(quantization: dict, path: str) -> tuple[int, int, str] | None:
    """(group_size, bits, mode) for the layer at `path`, or None when that layer stays unquantized."""
    override = quantization.get(path, True)
    if override is False:
        return None
    settings = {**quantization, **override} if isinstance(override, dict) else quantization
    return settings["group_size"], settings["bits"], settings.get("mode", "affine")


def quantize_model(model: nn.Module, quantization: dict, present: set[str] | None = None) -> None:
    """Replace the linear, embedding and expert layers by quantized ones, in place.

    With `present` (the tensor names of a checkpoint being loaded), only layers whose `.scales` the checkpoint has
    are swapped, so the shapes then checked against the files are the quantized ones.

    The experts' joined gate and up stack is quantized as one (quantization groups run along the input, so that
    equals quantizing each); where the settings give gate and up of a layer different ones (mlx-lm's sensitivity-
    based mixed quantization does), that layer holds them apart instead, each with its own.
    """
    def settings(path: str, in_dims: int) -> tuple[int, int, str] | None:
        if present is not None and f"{path}.scales" not in present:
            return None
        found = layer_settings(quantization, path)
        return None if found is None or in_dims % found[0] else found

    for path, module in model.named_modules():
        if isinstance(module, SwitchMLP) and "gate_up_proj" in module:
            gate, up = (settings(p, module.gate_up_proj.weight.shape[-1])
                        for p in checkpoint_names(f"{path}.gate_up_proj"))
            if gate != up:
                module.unfuse()
    swaps = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding, SwitchLinear)):
            continue
        found = settings(checkpoint_names(path)[0], module.weight.shape[-1])  # a joined stack's parts agree
        if found is None:
            continue
        group_size, bits, mode = found
        if isinstance(module, SwitchLinear):
            swaps.append((path, QuantizedSwitchLinear.from_weight(module.weight, group_size, bits, mode)))
        elif isinstance(module, nn.Embedding):
            swaps.append((path, QuantizedEmbedding.from_embedding(module, group_size, bits, mode=mode)))
        else:
            swaps.append((path, QuantizedLinear.from_linear(module, group_size, bits, mode=mode)))
    model.update_modules(tree_unflatten(swaps))


class QuantError(UserError):
    """Quantization settings that MLX cannot store, or a recipe that does not exist."""


# Per-layer bit widths on top of a base width, as (layer-path pattern, bits), the first match wins. FFN-down is
# the tensor most sensitive to quantization, the embedding (also the LM head when tied) and LM head next;
# llama.cpp's Q4_K_M and mlx-lm's mixed recipes make the same choices.
RECIPES: dict[str, tuple[int, tuple[tuple[str, int], ...]]] = {
    "mixed_2_6": (2, ((r"\.down_proj$", 6), (r"(^|\.)(embed_tokens|lm_head)$", 8))),
    "mixed_3_6": (3, ((r"\.down_proj$", 6), (r"(^|\.)(embed_tokens|lm_head)$", 8))),
    "mixed_4_6": (4, ((r"\.down_proj$", 6), (r"(^|\.)(embed_tokens|lm_head)$", 8))),
}
# The MoE router is a small matrix whose rounding moves whole tokens between experts: 8-bit, as mlx-lm does.
ROUTER = re.compile(r"\.mlp\.gate$")
ROUTER_SETTINGS = {"group_size": 64, "bits": 8, "mode": "affine"}
# The hybrid models' router and shared-expert gate stay in floating point: their few rows decide where every token
# goes and how much of the shared expert it gets (conv1d, A_log, dt_bias and the norms are no linear layers, so they
# are never quantized).
HYBRID_FLOAT = re.compile(r"\.mlp\.(gate|shared_expert_gate)$")


def quantizable_layers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint path -> weight shape of every layer quantize_model can swap (linear, embedding, expert stack);
    a joined stack counts as its parts, each with its share of the output rows."""
    layers = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding, SwitchLinear)):
            parts = checkpoint_names(path)
            *batch, rows, cols = m.weight.shape
            layers.update((part, (*batch, rows // len(parts), cols)) for part in parts)
    return layers


def plan_quantization(model: nn.Module, bits: int | None = None, group_size: int | None = None,
                      mode: str = "affine", recipe: str | None = None) -> dict:
    """The config.json "quantization" section for `model`, in mlx-lm's layout: the defaults, plus an entry for
    each layer that differs from them (its own full settings, or false for one left unquantized because its
    input size is not a multiple of the group size). Defaults: 4 bits, group 64 (32 for mxfp4/mxfp8, 16 nvfp4)."""
    if recipe is not None:
        if recipe not in RECIPES:
            raise QuantError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
        if mode != "affine":
            raise QuantError(f"recipe {recipe} mixes affine bit widths; it cannot be combined with --mode {mode}")
        base, rules = RECIPES[recipe]
        if bits is not None and bits != base:
            raise QuantError(f"recipe {recipe} quantizes to {base} bits; leave out --bits {bits} or the recipe")
        bits = base
    else:
        rules = ()
    if mode not in QUANT_FORMATS:
        raise QuantError(f"unsupported quantization mode {mode!r} (choose from {', '.join(QUANT_FORMATS)})")
    mode_bits, mode_groups = QUANT_FORMATS[mode]
    bits = 4 if bits is None and 4 in mode_bits else bits if bits is not None else mode_bits[0]
    group_size = group_size if group_size is not None else 64 if 64 in mode_groups else mode_groups[0]
    problem = quant_format_problem(mode, bits, group_size)
    if problem:
        raise QuantError(f"unsupported --bits {bits} --group-size {group_size} for --mode {mode} ({problem})")

    defaults = {"group_size": group_size, "bits": bits, "mode": mode}
    plan: dict = dict(defaults)
    hybrid = model.config.model_type in HYBRID_MODEL_TYPES
    for path, shape in sorted(quantizable_layers(model).items()):
        if hybrid and HYBRID_FLOAT.search(path):
            plan[path] = False
            continue
        settings = dict(defaults)
        if ROUTER.search(path):
            settings = dict(ROUTER_SETTINGS)
        for pattern, layer_bits in rules:
            if re.search(pattern, path):
                settings["bits"] = layer_bits
                break
        if shape[-1] % settings["group_size"]:
            plan[path] = False
        elif settings != defaults:
            plan[path] = settings
    return plan



def logit_agreement(reference: mx.array, other: mx.array) -> dict[str, float]:
    """How close `other`'s next-token distributions are to `reference`'s, over positions (..., vocab):
    KL(reference || other) in nats (mean and max over positions) and the fraction of positions whose argmax agrees."""
    ref = reference.astype(mx.float32).reshape(-1, reference.shape[-1])
    oth = other.astype(mx.float32).reshape(-1, other.shape[-1])
    log_p = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    log_q = oth - mx.logsumexp(oth, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    top1 = (ref.argmax(-1) == oth.argmax(-1)).astype(mx.float32).mean()
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "top1": top1.item()}


def perplexity(logits: mx.array, ids: mx.array) -> float:
    """exp of the mean negative log-likelihood of ids[1:] under logits[:-1] (one sequence: (L, vocab), (L,))."""
    logits = logits.astype(mx.float32)[:-1]
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, ids[1:, None], axis=-1)[:, 0]
    return math.exp(nll.mean().item())
