"""The MoE router after its matmul, in one launch: softmax over the experts, top-k, renormalization.

One warp per token: lane j holds experts j, j + 32, ... of the token's router logits. The softmax is a warp max and a
warp sum (in float, as the reference computes it in float32); the top k are k rounds of a warp maximum, ties going
to the lowest expert index, each round removing its winner. Output: the experts (T, k) uint32 in descending
probability, and their probabilities (T, k) float32, divided by their sum when NORM. Replaces the reference's cast,
softmax, argpartition, slice, take_along_axis and (with NORM) sum and divide: five to seven launches per MoE layer.
"""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.kernels.dialect import Kernel, Launch

MAX_EXPERTS = 512  # 16 logits per lane
MAX_TOP_K = 16
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

BODY = """
// logits (tokens, E) T -> experts (tokens, TOP_K) uint32, weights (tokens, TOP_K) float.
// Template: T, E (experts), TOP_K, NORM (bool). One warp per token.
constexpr int PER_LANE = (E + 31) / 32;
constexpr float NONE = -3.0e38f;  // below every probability and logit: a lane's slot past the last expert
const int token = int(GROUP_ID);
// logits is indexed, never held in a GLOBAL pointer: with fewer than 8 elements Metal passes it as constant.

float p[PER_LANE];
float top = NONE;
UNROLL for (int j = 0; j < PER_LANE; j++) {
  const int e = int(LANE) + 32 * j;
  p[j] = e < E ? static_cast<float>(logits[size_t(token) * E + e]) : NONE;
  top = p[j] > top ? p[j] : top;
}
top = WARP_MAX(top);
float sum = 0.0f;
UNROLL for (int j = 0; j < PER_LANE; j++) {
  p[j] = int(LANE) + 32 * j < E ? EXP(p[j] - top) : 0.0f;
  sum += p[j];
}
const float total = WARP_SUM(sum);
UNROLL for (int j = 0; j < PER_LANE; j++) {
  p[j] = int(LANE) + 32 * j < E ? p[j] / total : -1.0f;  // taken and absent slots: -1
}

uint32_t chosen[TOP_K];
float chosen_p[TOP_K];
float chosen_sum = 0.0f;
UNROLL for (int r = 0; r < TOP_K; r++) {
  float best = -1.0f;
  int best_e = E;
  UNROLL for (int j = 0; j < PER_LANE; j++) {
    if (p[j] > best) {  // strict: the lowest index of this lane's equals
      best = p[j];
      best_e = int(LANE) + 32 * j;
    }
  }
  const float winner = WARP_MAX(best);
  const int expert = int(-WARP_MAX(-(best == winner ? float(best_e) : float(E))));  // lowest index with it
  UNROLL for (int j = 0; j < PER_LANE; j++) {
    if (int(LANE) + 32 * j == expert) {
      p[j] = -1.0f;
    }
  }
  chosen[r] = uint32_t(expert);
  chosen_p[r] = winner;
  chosen_sum += winner;
}
if (int(LANE) == 0) {
  UNROLL for (int r = 0; r < TOP_K; r++) {
    experts[size_t(token) * TOP_K + r] = chosen[r];
    weights[size_t(token) * TOP_K + r] = NORM ? chosen_p[r] / chosen_sum : chosen_p[r];
  }
}
"""

KERNEL = Kernel("qwen_router", ("logits",), ("experts", "weights"), BODY)


def supports(logits: mx.array, top_k: int) -> bool:
    experts = logits.shape[-1] if logits.ndim else 0
    return logits.dtype in DTYPES and 0 < experts <= MAX_EXPERTS and 0 < top_k <= min(MAX_TOP_K, experts) \
        and logits.size > 0


def launch(logits: mx.array, top_k: int, norm: bool) -> Launch:
    """The call routing logits (..., E) -> experts (..., top_k) uint32, weights (..., top_k) float32."""
    e = logits.shape[-1]
    tokens = logits.size // e
    return Launch(
        inputs=[logits.reshape(tokens, e)],
        template=[("T", logits.dtype), ("E", e), ("TOP_K", top_k), ("NORM", norm)],
        grid=(tokens * 32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(*logits.shape[:-1], top_k)] * 2,
        output_dtypes=[mx.uint32, mx.float32],
    )
