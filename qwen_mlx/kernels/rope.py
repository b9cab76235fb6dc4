"""RoPE on Q and K in one kernel, optionally after Qwen3's per-head RMSNorm, with the transpose to heads-first.

q (B, L, Hq, D) and k (B, L, Hk, D), as the projections leave them, become (B, Hq, L, D) and (B, Hk, L, D):
each head vector is (optionally) RMS-normalized with its weight, then its two halves (x1, x2) = (x[:D/2], x[D/2:])
are rotated by angle (offset + l) * inv_freq[i] (NeoX layout); YaRN's attention factor is not applied here (the
model folds it into the softmax scale). One warp per head vector: lane j holds pairs j, j + 32, ..., so the RMS is
one warp reduction. The normalized value is rounded to T as
`nn.RMSNorm` rounds it (T(x * rms) first, then times the weight in T), so the fused kernel equals norm-then-rope.
"""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.kernels.dialect import Kernel, Launch

WARPS = 4  # head vectors per threadgroup
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

BODY = """
// q (B, L, HQ, D), k (B, L, HK, D) T; inv_freq (D / 2) float; q_weight, k_weight (D) T (unread without NORM);
// params float [eps]; offset int [1] -> q_out (B, HQ, L, D), k_out (B, HK, L, D) T.
// Template: T, D, NORM (bool), WARPS (warps per threadgroup).
constexpr int HALF = D / 2;
constexpr int PAIRS = HALF / 32;  // pairs (i, i + D / 2) per lane

const int B = q_shape[0];
const int L = q_shape[1];
const int HQ = q_shape[2];
const int HK = k_shape[2];
int vec = int(GROUP_ID) * WARPS + int(WARP);  // which head vector: all of q's, then all of k's
if (vec >= B * L * (HQ + HK)) {
  return;  // the whole warp leaves together
}
const bool is_q = vec < B * L * HQ;
const int heads = is_q ? HQ : HK;
if (!is_q) {
  vec -= B * L * HQ;
}
const int h = vec % heads;  // input layout (B, L, heads, D)
const int l = (vec / heads) % L;
const int b = vec / (heads * L);
const GLOBAL T* src = (is_q ? q : k) + size_t(vec) * D;
GLOBAL T* dst = (is_q ? q_out : k_out) + ((size_t(b) * heads + h) * L + l) * D;

float x1[PAIRS];
float x2[PAIRS];
UNROLL for (int j = 0; j < PAIRS; j++) {
  x1[j] = static_cast<float>(src[int(LANE) + 32 * j]);
  x2[j] = static_cast<float>(src[int(LANE) + 32 * j + HALF]);
}
if (NORM) {
  float squares = 0.0f;
  UNROLL for (int j = 0; j < PAIRS; j++) {
    squares += x1[j] * x1[j] + x2[j] * x2[j];
  }
  const float rms = RSQRT(WARP_SUM(squares) / D + params[0]);
  const GLOBAL T* weight = is_q ? q_weight : k_weight;
  UNROLL for (int j = 0; j < PAIRS; j++) {
    const int i = int(LANE) + 32 * j;
    x1[j] = static_cast<float>(static_cast<T>(static_cast<float>(static_cast<T>(x1[j] * rms)) *
                                              static_cast<float>(weight[i])));
    x2[j] = static_cast<float>(static_cast<T>(static_cast<float>(static_cast<T>(x2[j] * rms)) *
                                              static_cast<float>(weight[i + HALF])));
  }
}
const float position = float(offset[0] + l);
UNROLL for (int j = 0; j < PAIRS; j++) {
  const int i = int(LANE) + 32 * j;
  const float angle = position * inv_freq[i];
  const float c = COS(angle);
  const float s = SIN(angle);
  dst[i] = static_cast<T>(x1[j] * c - x2[j] * s);
  dst[i + HALF] = static_cast<T>(x2[j] * c + x1[j] * s);
}
"""

KERNEL = Kernel("qwen_rope", ("q", "k", "inv_freq", "q_weight", "k_weight", "params", "offset"),
                ("q_out", "k_out"), BODY)


def supports(q: mx.array, k: mx.array) -> bool:
    d = q.shape[-1]
    return q.dtype in DTYPES and k.dtype == q.dtype and q.ndim == 4 and d % 64 == 0 and k.shape[-1] == d \
        and q.shape[:2] == k.shape[:2]


def launch(q: mx.array, k: mx.array, inv_freq: mx.array, offset: int | mx.array,
           norms: tuple[mx.array, mx.array, float] | None) -> Launch:
    """The call rotating q (B, L, Hq, D) and k (B, L, Hk, D); see `supports`."""
    B, L, hq, d = q.shape
    hk = k.shape[2]
    q_weight, k_weight, eps = norms if norms is not None else (q, k, 0.0)  # placeholders, unread without NORM
    offset = mx.array([offset], mx.int32) if isinstance(offset, int) else offset.reshape(1).astype(mx.int32)
    vectors = B * L * (hq + hk)
    groups = -(-vectors // WARPS)
    return Launch(
        inputs=[q, k, inv_freq.astype(mx.float32), q_weight.astype(q.dtype), k_weight.astype(q.dtype),
                mx.array([eps], mx.float32), offset],
        template=[("T", q.dtype), ("D", d), ("NORM", norms is not None), ("WARPS", WARPS)],
        grid=(groups * WARPS * 32, 1, 1),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[(B, hq, L, d), (B, hk, L, d)],
        output_dtypes=[q.dtype, q.dtype],
    )
