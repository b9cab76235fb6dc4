"""Checkpoint names -> the model's parameter names: the one place names change.

A Hugging Face or mlx-lm checkpoint names its tensors by the model's module paths (models/qwen3.py), except:
  - MoE experts: Hugging Face holds each expert apart (`...mlp.experts.{e}.{proj}.{kind}`), mlx-lm and the model
    hold one stack (E, out, in) per projection (`...mlp.switch_mlp.{proj}.{kind}`): expert_stack / expert_piece;
  - the model joins the experts' gate and up stacks into one gate_up_proj (models.qwen3.checkpoint_names);
  - tensors no model uses: the rotary inv_freq buffer, the lm_head of a tied embedding (unused);
  - the hybrid models (models/qwen3_5.py): Qwen3.5's image-text files hold the language model under
    `model.language_model.` (Hugging Face) or `language_model.model.` (mlx-lm), and a vision tower that the text
    model does not run (model_name: None, never read); the multi-token-prediction head (`mtp.*`, maybe spelled
    `model.mtp.*`) is read only when asked for (model_name(name, mtp=True)); the hub's stacked experts
    (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)); and two values in Hugging Face's
    files, the zero-centred norms' w (the model holds 1 + w) and conv1d's (C, 1, width) layout (hybrid_values).
llama.cpp's GGUF names (`blk.{i}.attn_q.weight`, `blk.{i}.ssm_a`, ...) map onto the Hugging Face ones: gguf_name.
sanitize applies all of it to a checkpoint's tensors, stacking experts without a second copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from qwen_mlx.errors import UserError
from qwen_mlx.models.config import HYBRID_MODEL_TYPES, ModelConfig
from qwen_mlx.models.qwen3 import checkpoint_names

_EXPERT = re.compile(r"^((?:model|mtp)\.layers\.\d+\.mlp)\.experts\.(\d+)\."
                     r"(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")

# llama.cpp tensor names -> Hugging Face names. The MoE expert stacks (E, out, in) map onto switch_mlp.
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj", "ffn_down_exps": "mlp.switch_mlp.down_proj",
    # the hybrid models (qwen35, qwen35moe, qwen3next); their values differ too (weights.gguf undoes that)
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z",
    "ssm_beta": "linear_attn.in_proj_b", "ssm_alpha": "linear_attn.in_proj_a", "ssm_ba": "linear_attn.in_proj_ba",
    "ssm_conv1d": "linear_attn.conv1d", "ssm_norm": "linear_attn.norm", "ssm_out": "linear_attn.out_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# Hugging Face parameters without a .weight: llama.cpp writes A_log as blk.{i}.ssm_a, dt_bias as dt_proj.bias
_GGUF_PARAM = {"ssm_a": "linear_attn.A_log", "ssm_dt.bias": "linear_attn.dt_bias"}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
GGUF_UNUSED = ("rope_freqs.weight",)  # llama.cpp's precomputed rope factors; we compute our own


# Checkpoint prefixes -> the model's (Qwen3.5's image-text files, Hugging Face's and mlx-lm's spellings).
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_VISION = ("model.visual.", "visual.", "vision_tower.")
# The multi-token-prediction head, read only for speculative decoding with it (--mtp).
_MTP = ("mtp.", "model.mtp.")
_STACKED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
# The zero-centred RMSNorms of the hybrid models (x * (1 + w)); the gated norm of linear attention is not one.
_ZERO_CENTRED = re.compile(r"(\.input_layernorm|\.post_attention_layernorm|^model\.norm|\.q_norm|\.k_norm"
                           r"|^mtp\.(norm|pre_fc_norm_embedding|pre_fc_norm_hidden))\.weight$")


class LoadError(UserError):
    """A checkpoint cannot be found or loaded; the message is one sentence naming the file or tensor."""


class Experts(Protocol):
    """A stack of experts (E, ...) read one expert at a time (loader.ExpertRows), or an mx.array."""

    shape: tuple[int, ...]
    dtype: mx.Dtype

    def __getitem__(self, e: int) -> mx.array: ...


def unused(name: str, cfg: ModelConfig) -> bool:
    """A checkpoint tensor that no model uses (it is skipped, not an error)."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name.startswith("lm_head."))


def model_name(name: str, mtp: bool = False) -> str | None:
    """The model's name of a checkpoint tensor (or layer path); None for one the text model does not use (the MTP
    head's unless `mtp`)."""
    if name.startswith(_VISION) or (is_mtp(name) and not mtp):
        return None
    if name.startswith("model.mtp."):
        name = name.removeprefix("model.")
    for old, new in _PREFIXES:
        if (name + ".").startswith(old):  # a tensor under the prefix, or the layer path itself (quantization keys)
            name = (new + (name + ".")[len(old):]).removesuffix(".")
            break
    return _STACKED_EXPERTS.sub(r".mlp.switch_mlp.\1.weight", name)


def is_vision_tower(name: str) -> bool:
    return name.startswith(_VISION)


def hybrid_hf_layout(tensors: dict) -> bool:
    """Whether a hybrid checkpoint's tensors (anything with a shape, by name) are in Hugging Face's layout:
    conv1d.weight (C, 1, width) there, (C, width, 1) in mlx-lm's (the config refuses width 1, so the two never
    look alike). The whole checkpoint decides, so a pipeline stage without linear layers converts its norms too."""
    return any(name.endswith(".conv1d.weight") and tensors[name].shape[-1] != 1 for name in tensors)


def hybrid_values(weights: dict[str, mx.array]) -> None:
    """A hybrid model's Hugging Face tensors in the model's layout, in place: conv1d.weight (C, 1, width) becomes
    (C, width, 1) and each zero-centred norm's w becomes 1 + w (mlx-lm's files hold both already)."""
    for name in [n for n in weights if n.endswith(".conv1d.weight") or _ZERO_CENTRED.search(n)]:
        weights[name] = hybrid_value(name, weights[name])


def hybrid_value(name: str, w: mx.array) -> mx.array:
    """One tensor of hybrid_values (model name, Hugging Face value -> the model's value; others unchanged)."""
    if name.endswith(".conv1d.weight"):
        return w.moveaxis(2, 1)  # (C, 1, width) -> (C, width, 1)
    if _ZERO_CENTRED.search(name):
        return (w.astype(mx.float32) + 1.0).astype(w.dtype)
    return w


def hybrid_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape hybrid_value gives a tensor of this name and Hugging Face shape."""
    return (shape[0], shape[2], shape[1]) if name.endswith(".conv1d.weight") else shape


def is_mtp(name: str) -> bool:
    """A tensor (or layer path) of the multi-token-prediction head."""
    return name.startswith(_MTP)


def stacked_experts(name: str) -> tuple[str, ...]:
    """The hub's stacked expert tensor (model name `...switch_mlp.gate_up_proj.weight` (E, 2I, H) or
    `...switch_mlp.down_proj.weight`) -> the checkpoint names its rows split into (gate rows first); () otherwise."""
    if name.endswith(".switch_mlp.gate_up_proj.weight"):
        stem = name.removesuffix(".gate_up_proj.weight")
        return f"{stem}.gate_proj.weight", f"{stem}.up_proj.weight"
    return (name,) if name.endswith(".switch_mlp.down_proj.weight") else ()


def mlx_lm_name(name: str, model_type: str) -> str:
    """The model's checkpoint name -> the name mlx-lm's own convert writes: Qwen3.5's image-text classes hold the
    text model under `language_model.` (mlx_lm.models.qwen3_5.Model), and mlx-lm's per-layer quantization keys are
    module paths of that class, so a converted file uses them; the MTP head and other families keep theirs."""
    if model_type in ("qwen3_5", "qwen3_5_moe") and (name == "lm_head" or name.startswith(("model.", "lm_head."))) \
            and not is_mtp(name):
        return f"language_model.{name}"
    return name


def expert_stack(name: str) -> tuple[str, int] | None:
    """`...mlp.experts.{e}.{proj}.{kind}` -> (`...mlp.switch_mlp.{proj}.{kind}`, e); None for any other name."""
    m = _EXPERT.match(name)
    return None if m is None else (f"{m[1]}.switch_mlp.{m[3]}.{m[4]}", int(m[2]))


def expert_piece(stacked: str, e: int | str) -> str:
    """The inverse of expert_stack: expert e's own tensor of the stack `stacked` (for messages)."""
    return stacked.replace(".switch_mlp.", f".experts.{e}.")


def gguf_name(name: str) -> str | None:
    """A llama.cpp tensor name -> its Hugging Face name; None when a Qwen model has no such tensor."""
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_GLOBAL and kind == "weight":
        return f"{_GGUF_GLOBAL[stem]}.weight"
    m = _GGUF_LAYER.match(name)
    if m is None:
        return None
    layer, rest = int(m[1]), m[2]
    if rest in _GGUF_PARAM:
        return f"model.layers.{layer}.{_GGUF_PARAM[rest]}"
    stem, _, kind = rest.rpartition(".")
    if stem in _GGUF_BLOCK and kind in ("weight", "bias"):
        return f"model.layers.{layer}.{_GGUF_BLOCK[stem]}.{kind}"
    return None


def gguf_layer(name: str) -> int | None:
    """The block a llama.cpp tensor belongs to (blk.{i}.*); None for a global one."""
    m = _GGUF_LAYER.match(name)
    return None if m is None else int(m[1])


def sanitize(weights: dict[str, mx.array | Experts], cfg: ModelConfig, params: set[str],
             experts: range | None = None, hf_layout: bool | None = None) -> dict[str, mx.array]:
    """Checkpoint names -> the model's `params`: drop what a model does not use, stack per-expert MoE tensors
    (E, out, in), and join the experts' gate and up stacks into the model's gate_up_proj where it holds one.
    With `experts`, the stacks hold only those experts (stacked from 0) and only they are read. A hybrid model's
    Hugging Face values are converted (`hf_layout`; None: judged from the conv weights among `weights`).

    Consumes `weights` (emptied), so that each expert piece is freed as soon as it has been copied."""
    out: dict[str, mx.array] = {}
    per_expert: dict[str, dict[int, mx.array]] = {}  # stacked name -> expert -> piece
    while weights:
        name, value = weights.popitem()
        if unused(name, cfg):
            continue
        piece = expert_stack(name)
        if piece:
            stacked, e = piece
            per_expert.setdefault(stacked, {})[e] = value
            continue
        out[name] = value
    if cfg.model_type in HYBRID_MODEL_TYPES and (hf_layout if hf_layout is not None else hybrid_hf_layout(out)):
        hybrid_values(out)
    stacks = {name: _Stack.of_experts(name, pieces, cfg.num_experts, experts) for name, pieces in per_expert.items()}
    for name in [n for n in out if ".switch_mlp." in n]:
        stacks[name] = _Stack.whole(name, out.pop(name), cfg.num_experts, experts)
    for name in sorted(params):
        parts = checkpoint_names(name)
        if len(parts) > 1 and all(p in stacks for p in parts):  # else check_weights names what is missing
            out[name] = _join_in_place([stacks.pop(p) for p in parts], name)
    for name, stack in stacks.items():  # not joined: a whole stack as it is, expert pieces stacked
        index, read = stack.pieces[0]
        out[name] = read() if index == (slice(None),) else _join_in_place([stack], name)
    return out


@dataclass
class _Stack:
    """One expert stack (E, rows, ...) of the checkpoint, or its experts in a range (stacked from 0), as pieces
    (index into the stack, a function that reads the piece): E experts (Hugging Face's layout, index (e,)), the
    whole stack in one (mlx-lm's, index (:,)), or one expert of that stack at a time when a range is kept."""

    name: str
    pieces: list[tuple[tuple, Callable[[], mx.array]] | None]
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @classmethod
    def whole(cls, name: str, tensor: mx.array | Experts, num_experts: int, experts: range | None) -> _Stack:
        if experts is None:
            return cls(name, [((slice(None),), lambda: tensor)], tuple(tensor.shape), tensor.dtype)
        if tensor.shape[0] != num_experts:
            raise LoadError(f"tensor {name} has shape {tuple(tensor.shape)}: {tensor.shape[0]} experts, the config "
                            f"needs {num_experts}")
        pieces = [((i,), lambda e=e: tensor[e]) for i, e in enumerate(experts)]
        return cls(name, pieces, (len(experts), *tensor.shape[1:]), tensor.dtype)

    @classmethod
    def of_experts(cls, name: str, pieces: dict[int, mx.array], num_experts: int,
                   experts: range | None) -> _Stack:
        if sorted(pieces) != list(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(pieces))
            raise LoadError(f"tensor {expert_piece(name, missing[0] if missing else '?')} is missing")
        shape, dtype = tuple(pieces[0].shape), pieces[0].dtype
        for e, piece in pieces.items():
            if tuple(piece.shape) != shape or piece.dtype != dtype:
                raise LoadError(f"expert {e} of {name} has shape {tuple(piece.shape)} {piece.dtype}, "
                                f"expert 0 has {shape} {dtype}")
        kept = experts if experts is not None else range(num_experts)
        reads = [((i,), lambda piece=pieces.pop(e): piece) for i, e in enumerate(kept)]
        pieces.clear()  # the other experts' pieces, never read
        return cls(name, reads, (len(kept), *shape), dtype)


def _join_in_place(stacks: list[_Stack], name: str) -> mx.array:
    """The stacks joined along their rows (axis 1), without a second copy: each piece is read straight into its
    slot of one buffer and dropped, so loading never holds more than the joined tensor plus one piece."""
    first = stacks[0]
    E, _, *rest = first.shape
    for stack in stacks:
        if (stack.shape[0], *stack.shape[2:]) != (E, *rest) or stack.dtype != first.dtype:
            raise LoadError(f"{stack.name} {stack.shape} {stack.dtype} and {first.name} {first.shape} "
                            f"{first.dtype} do not join into {name}")
    joined = mx.zeros((E, sum(stack.shape[1] for stack in stacks), *rest), first.dtype)
    start = 0
    for stack in stacks:
        rows = slice(start, start + stack.shape[1])
        for i in range(len(stack.pieces)):
            index, read = stack.pieces[i]
            stack.pieces[i] = None
            joined[(*index, rows)] = read()  # the old buffer has no other reference, so MLX updates it in place
            del read  # and the piece, once read, is dropped
            mx.eval(joined)
        start = rows.stop
    return joined
