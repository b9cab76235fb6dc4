"""Qwen3.5 / Qwen3.5-MoE / Qwen3-Next: hybrid decoders of Gated DeltaNet and gated full-attention layers in MLX.

Layer i mixes tokens by `cfg.layer_types[i]`:

    linear_attention   Gated DeltaNet: a causal depthwise conv (+ SiLU) over q, k, v; per value head h and step t
                           S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T    (Dk, Dv)
                           y_t = S_t^T q_t
                       with q, k L2-normalised (q also scaled by Dk^-1/2), g = -exp(A_log) softplus(a + dt_bias),
                       beta = sigmoid(b); then RMSNorm(y) * silu(z) and out_proj. The state S is float32.
    full_attention     softmax attention with QK-norm, RoPE on the first partial_rotary_factor of each head, and
                       the output multiplied by sigmoid(gate), the gate being the second half of q_proj's rows.

then a SwiGLU MLP, or (MoE layers) a routed mixture of experts plus a shared expert scaled by
sigmoid(shared_expert_gate(x)).

Module paths equal the Hugging Face weight names. Two values differ from a Hugging Face file (the loader converts
them once): the zero-centred RMSNorms (x * (1 + w): input, post-attention, final, q and k norms) hold 1 + w, and
conv1d.weight is MLX's (channels, width, 1); both as in mlx-lm's layout, so its files load unchanged. Prefill runs
the delta rule in chunks of 64 tokens (`chunked_delta_rule`, matmuls within a chunk, a scan across chunks; 16 on
the CPU backend, see models/fused.py); decode (one token) runs the recurrence (`delta_rule_step`).
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.qwen3 import MLP, Cache, SparseMoE
from qwen_mlx.models.rope import Rope, make_rope, softmax_scale

CHUNK = 64  # tokens per chunk of the chunked delta rule (transformers' torch_chunk_gated_delta_rule, fla)


class RecurrentState(Protocol):
    """What GatedDeltaNet needs of its cache (cache.recurrent.RecurrentCache): the conv's last width - 1 inputs
    (B, width - 1, conv_dim) and the state (B, Hv, Dk, Dv) float32, both None before the first token."""

    conv_tail: mx.array | None
    recurrent_state: mx.array | None

    def advance(self, conv_tail: mx.array, recurrent_state: mx.array, n: int) -> None:
        """Hold these after n more tokens."""
        ...

    def cuts(self, n: int) -> list[int]:
        """Where among the next n tokens to stop for a snapshot (counts of tokens in 1..n-1, sorted)."""
        ...


# ------------------------------------------------------------------------------------------------ the delta rule


def delta_rule_step(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                    state: mx.array) -> tuple[mx.array, mx.array]:
    """One token of the gated delta rule (the reference the decode kernel is checked against).

    q, k (B, Hk, Dk) L2-normalised, q also scaled by Dk^-1/2; v (B, Hv, Dv); g (B, Hv) log-decay; beta (B, Hv);
    state (B, Hv, Dk, Dv) float32. Value head h reads key head h // (Hv // Hk). Returns y (B, Hv, Dv) float32
    and the new state."""
    rep = v.shape[1] // k.shape[1]
    q, k = mx.repeat(q, rep, axis=1)[..., None], mx.repeat(k, rep, axis=1)[..., None]  # (B, Hv, Dk, 1)
    state = state * mx.exp(g)[..., None, None]
    predicted = (state * k).sum(axis=-2)  # S^T k: (B, Hv, Dv)
    delta = (v - predicted) * beta[..., None]
    state = state + k * delta[..., None, :]  # k delta^T
    return (state * q).sum(axis=-2), state


def chunked_delta_rule(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array,
                       chunk: int = CHUNK) -> tuple[mx.array, mx.array]:
    """The gated delta rule over L tokens in chunks of `chunk` (a power of two): equal to L calls of delta_rule_step.

    q, k (B, L, Hk, Dk) normalised as for delta_rule_step; v (B, L, Hv, Dv); g, beta (B, L, Hv); state
    (B, Hv, Dk, Dv) float32. Returns y (B, L, Hv, Dv) float32 and the state after the last token.

    Within a chunk (positions i, j; G = cumulative g from the chunk's start; S the state at the chunk's start) the
    updates solve the unit lower triangular system (I + A) U = beta V with A_ij = beta_i k_i.k_j exp(G_i - G_j) for
    j < i (the UT transform of DeltaNet); the updates written are U - W S, and

        y     = exp(G) q S + inner (U - W S) = (exp(G) q - inner W) S + inner U     inner_ij = q_i.k_j exp(G_i - G_j)
        S_out = exp(G_last) S + (exp(G_last - G) k)^T (U - W S)

    so everything but three (chunk x Dk)-by-(Dk x Dv) products per chunk is computed for all chunks at once, and
    only the chunks are a scan. Decays and products under e^-40 count as 0 (decay_factor, flush)."""
    B, L, Hk, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    rep = Hv // Hk
    n = -(-L // chunk)
    pad = n * chunk - L

    def chunks(x: mx.array) -> mx.array:  # (B, L, H, ...) -> (n, B, H, chunk, ...), padded with zeros
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, n, chunk, *x.shape[2:])
        return mx.moveaxis(mx.moveaxis(x, 1, 0), 3, 2)

    q, k = chunks(q), chunks(k)  # (n, B, Hk, C, Dk)
    v, g, beta = chunks(v), chunks(g), chunks(beta)  # (n, B, Hv, C, Dv), (n, B, Hv, C)
    kk = mx.repeat(k @ k.swapaxes(-1, -2), rep, axis=2)  # (n, B, Hv, C, C): k_i.k_j, once per key head
    qk = mx.repeat(q @ k.swapaxes(-1, -2), rep, axis=2)
    q, k = mx.repeat(q, rep, axis=2), mx.repeat(k, rep, axis=2)  # (n, B, Hv, C, Dk)
    G = mx.cumsum(g, axis=-1)  # (n, B, Hv, C): log of the decay from the chunk's start
    i = mx.arange(chunk)
    causal, strict = i[:, None] >= i[None, :], i[:, None] > i[None, :]
    decay = decay_factor(mx.where(causal, G[..., :, None] - G[..., None, :], -mx.inf))  # (n, B, Hv, C, C)
    solve = unit_lower_inverse(mx.where(strict, beta[..., None] * kk * decay, 0.0))  # (I + A)^-1
    U = solve @ (v * beta[..., None])  # (n, B, Hv, C, Dv): the updates before the old state is subtracted
    W = flush(solve @ (k * (beta * decay_factor(G))[..., None]))  # (n, B, Hv, C, Dk): what each update reads of S
    inner = qk * decay  # (n, B, Hv, C, C): attention within the chunk (causal, diagonal included)
    q_state = flush(q * decay_factor(G)[..., None] - inner @ W)  # (n, B, Hv, C, Dk): how y reads the first S
    inner_U = inner @ U  # (n, B, Hv, C, Dv)
    k_out = mx.contiguous((k * decay_factor(G[..., -1:] - G)[..., None]).swapaxes(-1, -2))  # (n, B, Hv, Dk, C)
    chunk_decay = decay_factor(G[..., -1])[..., None, None]  # (n, B, Hv, 1, 1)
    ys = []
    for c in range(n):
        ys.append(q_state[c] @ state + inner_U[c])  # (B, Hv, C, Dv)
        state = state * chunk_decay[c] + k_out[c] @ (U[c] - W[c] @ state)
    y = mx.stack(ys, axis=1).swapaxes(2, 3).reshape(B, n * chunk, Hv, Dv)  # (B, n, Hv, C, Dv) -> (B, L', Hv, Dv)
    return y[:, :L], state


def decay_factor(log_decay: mx.array) -> mx.array:
    """exp(log_decay) for log_decay <= 0, with what falls under e^-40 (4e-18, ten orders below float32's resolution
    of a term of order 1) set to 0. Products of two such factors then stay above float32's smallest normal number
    (e^-87): on the CPU an operation on subnormal numbers costs ~100x (MLX does not flush them to zero), and strong
    decays over a chunk otherwise fill the chunk's matrices with them."""
    return mx.where(log_decay > -40.0, mx.exp(log_decay), 0.0)


def flush(x: mx.array) -> mx.array:
    """x with entries under e^-40 in magnitude set to 0 (the same bound as decay_factor's, for products of them)."""
    return mx.where(mx.abs(x) > 4.25e-18, x, 0.0)


def unit_lower_inverse(A: mx.array) -> mx.array:
    """(I + A)^-1 for strictly lower triangular A (..., C, C), C a power of two, by doubling the diagonal blocks:

        [[M11, 0], [M21, M22]]^-1 = [[X11, 0], [-X22 M21 X11, X22]]     (X = M^-1 of each half)

    from 1 x 1 blocks (the unit diagonal) up to C x C: log2(C) rounds of two batched matmuls, stable where the
    series sum_n (-A)^n is not (nearly parallel keys make its terms large and cancelling). Products are flushed
    (entries under e^-40 set to 0): a chain of decays within the chunk otherwise makes subnormal numbers."""
    C = A.shape[-1]
    lead = A.shape[:-2]
    X = mx.ones((*lead, C, 1, 1), A.dtype)  # the inverses of the diagonal blocks, (..., C / s, s, s)
    s = 1
    while s < C:
        n = C // s  # blocks of size s along the diagonal
        blocks = A.reshape(*lead, n, s, n, s).swapaxes(-3, -2).reshape(*lead, n * n, s, s)
        below = mx.take(blocks, mx.arange(1, n, 2) * n + mx.arange(0, n, 2), axis=-3)  # M21 of each pair
        X11, X22 = X[..., 0::2, :, :], X[..., 1::2, :, :]
        X21 = -flush(flush(X22 @ below) @ X11)
        top = mx.concatenate([X11, mx.zeros_like(X11)], axis=-1)
        X = mx.concatenate([top, mx.concatenate([X21, X22], axis=-1)], axis=-2)  # (..., n / 2, 2s, 2s)
        s *= 2
    return X.reshape(*lead, C, C)


# ------------------------------------------------------------------------------------------------------- layers


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y) * w * silu(z) over each value head (its weight is a plain, not zero-centred, scale)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, y: mx.array, z: mx.array) -> mx.array:
        return mx.fast.rms_norm(y, self.weight, self.eps) * nn.silu(z.astype(mx.float32))


class GatedDeltaNet(nn.Module):
    """The linear-attention token mixer. Its cache (cache.recurrent.RecurrentCache) holds the conv's last
    width - 1 inputs and the state S."""

    chunk = CHUNK  # tokens per chunk of the prefill's delta rule (models/fused.py gives the CPU its own)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.Dk, self.Dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        key_dim, value_dim = self.Hk * self.Dk, self.Hv * self.Dv
        conv_dim = 2 * key_dim + value_dim
        dim = cfg.hidden_size
        self.qwen3_next_layout = cfg.model_type == "qwen3_next"
        if self.qwen3_next_layout:  # q, k, v, z and b, a interleaved per key-head group
            self.in_proj_qkvz = nn.Linear(dim, 2 * key_dim + 2 * value_dim, bias=False)
            self.in_proj_ba = nn.Linear(dim, 2 * self.Hv, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(dim, conv_dim, bias=False)
            self.in_proj_z = nn.Linear(dim, value_dim, bias=False)
            self.in_proj_b = nn.Linear(dim, self.Hv, bias=False)
            self.in_proj_a = nn.Linear(dim, self.Hv, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.dt_bias = mx.ones((self.Hv,))
        self.A_log = mx.zeros((self.Hv,))
        self.norm = GatedRMSNorm(self.Dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, dim, bias=False)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """x (B, L, dim) -> qkv (B, L, 2 Hk Dk + Hv Dv) as [q | k | v], z (B, L, Hv, Dv), b and a (B, L, Hv)."""
        B, L, _ = x.shape
        if not self.qwen3_next_layout:
            return (self.in_proj_qkv(x), self.in_proj_z(x).reshape(B, L, self.Hv, self.Dv), self.in_proj_b(x),
                    self.in_proj_a(x))
        rep = self.Hv // self.Hk
        qkvz = self.in_proj_qkvz(x).reshape(B, L, self.Hk, 2 * self.Dk + 2 * rep * self.Dv)  # per key head
        q, k, v, z = mx.split(qkvz, [self.Dk, 2 * self.Dk, 2 * self.Dk + rep * self.Dv], axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, self.Hk, 2 * rep), 2, axis=-1)
        qkv = mx.concatenate([t.reshape(B, L, -1) for t in (q, k, v)], axis=-1)
        return qkv, z.reshape(B, L, self.Hv, self.Dv), b.reshape(B, L, self.Hv), a.reshape(B, L, self.Hv)

    def step(self, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
             state: mx.array) -> tuple[mx.array, mx.array]:
        """One token of the delta rule (the decode kernel is swapped in here on a GPU: models/fused.py)."""
        return delta_rule_step(q, k, v, g, beta, state)

    def __call__(self, x: mx.array, cache: RecurrentState | None) -> mx.array:
        B, L, _ = x.shape
        qkv, z, b, a = self.project(x)
        width = self.conv1d.weight.shape[1]
        tail = cache.conv_tail if cache is not None and cache.conv_tail is not None else \
            mx.zeros((B, width - 1, qkv.shape[-1]), qkv.dtype)
        window = mx.concatenate([tail, qkv], axis=1)  # (B, width - 1 + L, conv_dim): earlier inputs first
        w = self.conv1d.weight[:, :, 0]  # (conv_dim, width)
        qkv = nn.silu(sum(window[:, j : j + L] * w[:, j] for j in range(width)))  # causal depthwise conv
        q, k, v = mx.split(qkv, [self.Hk * self.Dk, 2 * self.Hk * self.Dk], axis=-1)
        q = l2_normalize(q.reshape(B, L, self.Hk, self.Dk).astype(mx.float32)) * self.Dk**-0.5
        k = l2_normalize(k.reshape(B, L, self.Hk, self.Dk).astype(mx.float32))
        v = v.reshape(B, L, self.Hv, self.Dv).astype(mx.float32)
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias)  # (B, L, Hv)
        beta = mx.sigmoid(b.astype(mx.float32))
        state = cache.recurrent_state if cache is not None and cache.recurrent_state is not None else \
            mx.zeros((B, self.Hv, self.Dk, self.Dv), mx.float32)
        bounds = [0, *(cache.cuts(L) if cache is not None else []), L]  # pieces end where a snapshot is wanted
        ys = []
        for start, end in zip(bounds, bounds[1:]):
            if end - start == 1:
                y, state = self.step(q[:, start], k[:, start], v[:, start], g[:, start], beta[:, start], state)
                y = y[:, None]
            else:
                y, state = chunked_delta_rule(q[:, start:end], k[:, start:end], v[:, start:end], g[:, start:end],
                                              beta[:, start:end], state, self.chunk)
            ys.append(y)  # (B, end - start, Hv, Dv)
            if cache is not None:
                cache.advance(window[:, end : end + width - 1], state, end - start)
        y = ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=1)
        y = self.norm(y, z).astype(x.dtype)  # (B, L, Hv, Dv)
        return self.out_proj(y.reshape(B, L, -1))


class GatedAttention(nn.Module):
    """Softmax attention whose output is gated: q_proj yields, per head, the query and a gate (sigmoid)."""

    def __init__(self, cfg: ModelConfig, rope: Rope):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dim, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(dim, 2 * self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)  # holds 1 + w (see the module docstring)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.rotary_dim = cfg.rotary_dim
        self._rope = rope
        self.scale = softmax_scale(cfg, rope)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)  # (B, heads, L, head_dim)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        # RoPE turns the first rotary_dim dims of each head (split-half pairs within them); the rest pass.
        q, k = (mx.fast.rope(t, self.rotary_dim, traditional=False, base=None, scale=1.0, offset=offset,
                             freqs=self._rope.wavelengths) for t in (q, k))
        if cache is None:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        else:
            out = cache.attend(q, k, v, self.scale)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, heads * head_dim)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)))


class SharedExpertMoE(SparseMoE):
    """The routed experts (softmax, top-k, renormalized when norm_topk_prob) plus a shared expert, scaled per
    token by sigmoid(shared_expert_gate(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: Rope, layer: int, *, full_attention: bool = False):
        super().__init__()
        self.is_linear = cfg.is_linear_layer(layer) and not full_attention
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg, rope)
        self.mlp = SharedExpertMoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache) -> mx.array:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class HybridModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: range | None = None):
        super().__init__()
        rope = make_rope(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        chosen = layers if layers is not None else range(cfg.num_hidden_layers)
        self.layers = [Block(cfg, rope, i) for i in chosen]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list | None) -> mx.array:
        h = self.embed_tokens(tokens)  # (B, L, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        return self.norm(h)


class MTP(nn.Module):
    """The multi-token-prediction head (one layer, as in vLLM's and SGLang's Qwen3-Next / Qwen3.5 MTP models):
    from the hidden state h_t of position t (the model's, after its final norm) and the embedding e of token t + 1,

        x = fc([norm_e(e) | norm_h(h_t)])         fc: 2 dim -> dim, the embedding's half first
        x = layer(x)                              a full-attention decoder layer at position t, with its own KV cache
        h' = norm(x)                              -> the model's head gives the logits of token t + 2

    and h' stands in for h_{t+1} when it drafts one more token. All four norms are zero-centred (hold 1 + w)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.pre_fc_norm_embedding = nn.RMSNorm(dim, eps=cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(dim, eps=cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * dim, dim, bias=False)
        self.layers = [Block(cfg, make_rope(cfg), 0, full_attention=True)]  # MoE as the model's layer 0 is
        self.norm = nn.RMSNorm(dim, eps=cfg.rms_norm_eps)

    def __call__(self, embedded: mx.array, hidden: mx.array, cache: Cache | None) -> mx.array:
        """embedded: the next tokens' embeddings (B, L, dim); hidden: the hidden states before them (B, L, dim)
        -> h' (B, L, dim)."""
        x = mx.concatenate([self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden)], axis=-1)
        return self.norm(self.layers[0](self.fc(x), cache))


class Model(nn.Module):
    """The causal LM: tokens (B, L) -> logits (B, L, vocab); `cache` holds one cache per layer (a KV cache for
    full attention, a RecurrentCache for linear attention: cache.kv.make_cache builds the list).

    `layers` builds only those decoder layers (a pipeline stage; they are then numbered from 0); `mtp` adds the
    checkpoint's MTP head (`self.mtp`, run by engine.speculative.MTPDraft, never by __call__)."""

    def __init__(self, cfg: ModelConfig, layers: range | None = None, mtp: bool = False):
        super().__init__()
        self.config = cfg
        self.model = HybridModel(cfg, layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if mtp:
            self.mtp = MTP(cfg)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        return self.head(self.model(tokens, cache))

    def head(self, h: mx.array) -> mx.array:
        """Final hidden states (B, L, dim) -> logits (B, L, vocab)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[Block]:
        return self.model.layers
