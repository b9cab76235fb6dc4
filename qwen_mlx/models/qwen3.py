"""Qwen2 / Qwen3 / Qwen3-MoE decoder in MLX.

Module paths equal the Hugging Face weight names (model.layers.0.self_attn.q_proj ...), with one exception: the
experts' gate and up projections, which checkpoints hold apart, are one stack here (`checkpoint_names` maps it).
Plain MLX ops only, no loading, quantization or backend choice: quantized layers are swapped in from outside
(weights/quant.py), and on a GPU the fused kernels override the methods marked below (models/fused.py).
"""

from __future__ import annotations

import re
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.rope import Rope, make_rope, softmax_scale


class Cache(Protocol):
    """A per-layer KV cache (see cache.py). It owns the position and the storage format, so it also runs the
    attention over what it holds (a quantized cache attends with quantized matmuls, a rotating one masks its ring)."""

    offset: int  # tokens seen so far = position of the next token
    state: list[mx.array]  # the arrays holding what the cache has seen

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """Append k, v (B, n_kv, L, head_dim) and attend q (B, heads, L, head_dim) causally over all held keys."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: Rope):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.model_type != "qwen2":  # Qwen3: RMSNorm over each head of q and k, before RoPE
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self._rope = rope  # underscore: constants, not parameters
        self.scale = softmax_scale(cfg, rope)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.project(x)  # (B, L, heads * head_dim), (B, L, kv_heads * head_dim) twice
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, kv_heads, L, head_dim)
        q, k = self.norm_and_rotate(q, k, cache.offset if cache is not None else 0)  # (B, heads, L, head_dim)
        # GQA: the fused attention maps each group of n_rep query heads to its KV head; nothing is repeated.
        if cache is None:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        else:
            out = cache.attend(q, k, v, self.scale)  # rotated keys are what is cached
        # out: (B, heads, L, head_dim)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v = x W_q^T, x W_k^T, x W_v^T (+ bias in Qwen2). Fused: one launch for the three."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def norm_and_rotate(self, q: mx.array, k: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        """q (B, L, heads, head_dim), k (B, L, kv_heads, head_dim) -> heads first, (B, heads, L, head_dim):
        Qwen3's QK-norm (RMSNorm over each head of q and of k, before RoPE), then RoPE at positions offset,
        offset + 1, ... (offset (B,): one per sequence, a batched decode step). Fused: one launch for both."""
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotate(q.transpose(0, 2, 1, 3), offset), self.rotate(k.transpose(0, 2, 1, 3), offset)

    def rotate(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """RoPE, NeoX layout: the pair (x[i], x[i + head_dim / 2]) of position p turns by the angle p * inv_freq[i]
        (mx.fast.rope's `freqs` are the wavelengths 1 / inv_freq). x: (B, heads, L, head_dim)."""
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=self._rope.wavelengths)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))  # fused: gate, up and silu in one launch


class SwitchLinear(nn.Module):
    """A stack of per-expert linear layers (E, out, in); each token goes through the experts it is routed to."""

    def __init__(self, in_dims: int, out_dims: int, num_experts: int):
        super().__init__()
        scale = in_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, out_dims, in_dims))

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool = False) -> mx.array:
        # x: (..., 1 or k, 1, in), experts: (..., k) -> (..., k, 1, out)
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=experts, sorted_indices=sorted_experts)


class SparseMoE(nn.Module):
    """Qwen3-MoE feed-forward: softmax router, top-k experts, optional renormalization, no shared expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        dim, hidden, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.gate = nn.Linear(dim, n, bias=False)
        self.switch_mlp = SwitchMLP(dim, hidden, n)

    def __call__(self, x: mx.array) -> mx.array:
        experts, weights = self.route(self.gate(x))  # router logits (B, L, E) -> (B, L, k) each
        return self.switch_mlp(x, experts, weights)

    def route(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """Router logits (B, L, E) -> the top-k experts of each token (B, L, k) and their weights (B, L, k) float32:
        the softmax over all experts in float32, its k largest, renormalized to sum to 1 when norm_topk_prob.
        Fused: one launch."""
        probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # (B, L, E)
        experts = mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., :self.top_k]  # unordered top-k
        weights = mx.take_along_axis(probs, experts, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return experts, weights


class SwitchMLP(nn.Module):
    """The experts' SwiGLU. Gate and up are one stack (E, 2 * hidden, dim), gate rows first, so that one gather
    reads both for the selected experts; down is (E, dim, hidden)."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = SwitchLinear(dim, 2 * hidden, num_experts)
        self.down_proj = SwitchLinear(hidden, dim, num_experts)

    def __call__(self, x: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        """x (B, L, dim), experts and their weights (B, L, k) -> (B, L, dim): each token's experts, weighted, added."""
        B, L, k = experts.shape
        if experts.size < 64:  # decode: each token reads only its k experts
            x = mx.expand_dims(x, (-2, -3))  # (B, L, 1, 1, dim)
            h = self.activation(x, experts, False)  # (B, L, k, 1, hidden)
            return self.weighted_sum(h, experts, weights)
        # Prefill: sort the (token, expert) pairs by expert so that each expert's weights are read once.
        flat = experts.flatten()
        order = mx.argsort(flat)
        x = x.reshape(B * L, 1, -1)[order // k]  # (B*L*k, 1, dim), grouped by expert
        idx = flat[order]
        h = self.activation(x, idx, True)  # (B*L*k, 1, hidden)
        y = self.down_proj(h, idx, True)  # (B*L*k, 1, dim)
        y = y[mx.argsort(order)].reshape(B, L, k, -1)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def activation(self, x: mx.array, experts: mx.array, sorted_experts: bool) -> mx.array:
        """silu(gate) * up of the routed experts: x (..., 1, dim) -> (..., 1, hidden). Fused: one launch."""
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x, experts, sorted_experts), 2, axis=-1)
            return nn.silu(gate) * up
        # Held apart: a checkpoint quantized gate and up of this layer differently (see quant.quantize_model).
        return nn.silu(self.gate_proj(x, experts, sorted_experts)) * self.up_proj(x, experts, sorted_experts)

    def weighted_sum(self, h: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        """Each token's experts' down projections, weighted and added: h (..., k, 1, hidden), experts and weights
        (..., k) -> (..., dim). Fused: one launch."""
        y = self.down_proj(h, experts).squeeze(-2)  # (..., k, dim)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def unfuse(self) -> None:
        """Hold gate and up as two stacks (E, hidden, dim) under their checkpoint names, keeping their values."""
        num_experts, rows, dim = self.gate_up_proj.weight.shape
        gate, up = SwitchLinear(dim, rows // 2, num_experts), SwitchLinear(dim, rows // 2, num_experts)
        gate.weight, up.weight = mx.split(self.gate_up_proj.weight, 2, axis=1)
        del self["gate_up_proj"]
        self.gate_proj, self.up_proj = gate, up


# Checkpoints (Hugging Face's and mlx-lm's layouts) hold the experts' gate and up projections apart.
_GATE_UP = re.compile(r"(^|\.)switch_mlp\.gate_up_proj(?=\.|$)")


def checkpoint_names(name: str) -> tuple[str, ...]:
    """The checkpoint tensors (or layers) that a model parameter (or layer) joins along its output rows, in order:
    `...switch_mlp.gate_up_proj.weight` is `...switch_mlp.gate_proj.weight` then `...switch_mlp.up_proj.weight`;
    any other name is itself."""
    if not _GATE_UP.search(name):
        return (name,)
    return tuple(_GATE_UP.sub(rf"\1switch_mlp.{proj}", name) for proj in ("gate_proj", "up_proj"))


def checkpoint_weights(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Model parameters in the checkpoint layout (mlx-lm's): each joined stack split into its parts along the
    output rows (axis -2 of weight, scales and biases alike), as lazy views of the joined stack."""
    out = {}
    for name, p in params.items():
        parts = checkpoint_names(name)
        out.update(zip(parts, mx.split(p, len(parts), axis=-2) if len(parts) > 1 else [p]))
    return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: Rope, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, rope)
        self.mlp = SparseMoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: range | None = None):
        super().__init__()
        rope = make_rope(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        chosen = layers if layers is not None else range(cfg.num_hidden_layers)
        self.layers = [Block(cfg, rope, i) for i in chosen]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list[Cache] | None) -> mx.array:
        h = self.embed_tokens(tokens)  # (B, L, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        return self.norm(h)


class Model(nn.Module):
    """The causal LM: tokens (B, L) -> logits (B, L, vocab).

    `layers` builds only those decoder layers (a pipeline stage; they are then numbered from 0)."""

    def __init__(self, cfg: ModelConfig, layers: range | None = None):
        super().__init__()
        self.config = cfg
        self.model = QwenModel(cfg, layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        return self.head(self.model(tokens, cache))

    def head(self, h: mx.array) -> mx.array:
        """Final hidden states (B, L, dim) -> logits (B, L, vocab)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[Block]:
        return self.model.layers
