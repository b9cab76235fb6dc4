"""The gated delta rule for one decode token: the recurrence of a Gated DeltaNet (linear attention) layer.

For each batch row and value head h, with S (Dk, Dv) its float32 state and key head h // (Hv / Hk):

    S     = S * exp(g)                  decay
    kv    = S^T k                       what the state recalls for k     (Dv,)
    delta = (v - kv) * beta             the correction, scaled by the write strength
    S     = S + k delta^T               write it
    y     = S^T q                       read with q                      (Dv,)

This is transformers 5.25's `torch_recurrent_gated_delta_rule` (qwen3_5, qwen3_next) for one token, after its L2
norm of q and k and its q / sqrt(Dk), which the caller has applied.

The kernel: one warp per (batch, value head, block of 32 value columns); lane j owns column j of S (Dk floats)
and keeps it in registers, so the state is read once and written once, both coalesced (32 lanes read 32 adjacent
floats of a row of S), and each sum over Dk is the lane's own: no warp reduction, no atomics, no shared memory.
q and k are read by every lane of a warp at the same address (one load, broadcast).

The conv1d state update before it is not fused: the conv tail is 3 x (2 Hk Dk + Hv Dv) values (96 KiB per layer
at 35B-A3B's shapes, float32) against the 2 MiB of S, so fusing would save ~5 % of the traffic and a few small
launches, while q and k need their L2 norm over Dk between the conv and this step: a reduction across the lanes
of a column-per-lane layout, that every warp of a key head would redo. Worth revisiting only if device timings
show the conv's launches matter.
"""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.kernels.dialect import Kernel, Launch

MAX_DK = 128  # a lane's column of S in registers: 128 floats (every released Qwen3.5/3.6/Qwen3-Next model: 128)
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

BODY = """
// q, k (B, HK, DK) T; v (B, HV, DV) T; g (B, HV) TG; beta (B, HV) TB; state (B, HV, DK, DV) float
// -> y (B, HV, DV) T, state_out (B, HV, DK, DV) float.
// Template: T, TG, TB, HK, HV, DK, DV. One warp per (batch, value head, block of 32 columns); lane = column of S.
constexpr int BLOCKS = (DV + 31) / 32;
const int head = int(GROUP_ID) / BLOCKS;  // b * HV + h
const int column = (int(GROUP_ID) % BLOCKS) * 32 + int(LANE);
const int key_head = (head / HV) * HK + (head % HV) / (HV / HK);  // b * HK + h // (HV / HK)
if (column < DV) {
  // Offsets, not pointers: Metal passes an input of fewer than 8 elements in its constant address space.
  const size_t qk = size_t(key_head) * DK;  // q, k of this key head
  const size_t s0 = size_t(head) * DK * DV + column;  // S[0, column] of this head; row i at s0 + i * DV
  const float decay = EXP(static_cast<float>(g[head]));
  float s[DK];
  float kv = 0.0f;
  UNROLL for (int i = 0; i < DK; i++) {
    s[i] = state[s0 + size_t(i) * DV] * decay;
    kv += s[i] * static_cast<float>(k[qk + i]);
  }
  const float delta = (static_cast<float>(v[size_t(head) * DV + column]) - kv) * static_cast<float>(beta[head]);
  float out = 0.0f;
  UNROLL for (int i = 0; i < DK; i++) {
    s[i] += static_cast<float>(k[qk + i]) * delta;
    state_out[s0 + size_t(i) * DV] = s[i];
    out += s[i] * static_cast<float>(q[qk + i]);
  }
  y[size_t(head) * DV + column] = static_cast<T>(out);
}
"""

KERNEL = Kernel("qwen_gated_delta", ("q", "k", "v", "g", "beta", "state"), ("y", "state_out"), BODY)


def reference(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
              state: mx.array) -> tuple[mx.array, mx.array]:
    """One token of the gated delta rule in MLX ops: q, k (B, Hk, Dk) L2-normalised (q also scaled by Dk**-0.5),
    v (B, Hv, Dv), g (B, Hv) log-decay, beta (B, Hv), state (B, Hv, Dk, Dv) float32
    -> y (B, Hv, Dv) in v's dtype, the new state (B, Hv, Dk, Dv) float32."""
    repeat = v.shape[1] // k.shape[1]  # value heads per key head
    q, k = (mx.repeat(a.astype(mx.float32), repeat, axis=1)[..., None] for a in (q, k))  # (B, Hv, Dk, 1)
    decay = mx.exp(g.astype(mx.float32))[..., None, None]  # (B, Hv, 1, 1)
    beta = beta.astype(mx.float32)[..., None]  # (B, Hv, 1)
    state = state * decay
    kv = (state * k).sum(axis=-2)  # (B, Hv, Dv)
    delta = (v.astype(mx.float32) - kv) * beta  # (B, Hv, Dv)
    state = state + k * delta[..., None, :]  # (B, Hv, Dk, Dv)
    y = (state * q).sum(axis=-2)  # (B, Hv, Dv)
    return y.astype(v.dtype), state


def supports(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array) -> bool:
    if q.ndim != 3 or v.ndim != 3 or state.ndim != 4:
        return False
    b, hk, dk = q.shape
    hv, dv = v.shape[1:]
    return (q.dtype in DTYPES and k.dtype == v.dtype == q.dtype and g.dtype in DTYPES and beta.dtype in DTYPES
            and state.dtype == mx.float32 and k.shape == q.shape and v.shape[0] == b and hk > 0 and hv % hk == 0
            and g.shape == beta.shape == (b, hv) and state.shape == (b, hv, dk, dv) and 0 < dk <= MAX_DK
            and dv > 0 and b > 0)


def launch(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array) -> Launch:
    """The call for one decode token -> y (B, Hv, Dv) in v's dtype, the new state (B, Hv, Dk, Dv) float32."""
    b, hk, dk = q.shape
    hv, dv = v.shape[1:]
    groups = b * hv * ((dv + 31) // 32)
    return Launch(
        inputs=[q, k, v, g, beta, state],
        template=[("T", v.dtype), ("TG", g.dtype), ("TB", beta.dtype), ("HK", hk), ("HV", hv), ("DK", dk),
                  ("DV", dv)],
        grid=(groups * 32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[v.shape, state.shape],
        output_dtypes=[v.dtype, mx.float32],
    )
