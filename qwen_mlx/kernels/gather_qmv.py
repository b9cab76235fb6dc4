"""Decode products of tokens with their routed experts' affine-quantized weights: y[p] = x[p // SHARE] @ W[e[p]].T.

W is a stack of E expert matrices (E, N, K) stored as `mx.quantize` leaves it (qmatmul.py describes the layout):
`w` (E, N, K * bits / 32) uint32, `scales` and `biases` (E, N, K / group_size). A pair p is one (token, expert)
entry of the routing `experts` (flattened); its x row is p // SHARE (SHARE = k when each token's row serves its k
experts, as for the experts' gate/up; 1 when each pair has its own row, as for down).

Each pair is a one-row qmatmul on the matrix its expert index selects: the same warp layout and inner loop
(qmatmul.ROWS_ACC, with M = 1), with the weight, scale and bias base pointers moved to that expert. Threadgroups
run over (pair, block of ROWS * WARPS rows), flattened into one grid axis, pair-major.

Two fused forms serve the MoE block's decode step, so that it takes two launches (and no elementwise ops):
- SWIGLU_KERNEL: on the joined gate/up stack (E, 2 * N, K) (gate rows first), each warp computes the same rows of
  its expert's gate and up halves and stores silu(gate) * up: y (P, N), never the (P, 2 * N) product.
- SUM_KERNEL: for down, with the router's weights (P,) float32: y[t] = sum over the token's TOP pairs p of
  weight[p] * (x[p] @ W[e[p]].T), the TOP experts added in float registers: y (P / TOP, N), no (TOP, N)
  intermediate in memory. Threadgroups run over (token, row block).
"""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.kernels import qmatmul
from qwen_mlx.kernels.dialect import Kernel, Launch, in_device_memory

MAX_PAIRS = 64  # 8 decode tokens x 8 experts; more pairs are a prefill: mx.gather_qmm's sorted matmul wins there
INDEX_DTYPES = (mx.int32, mx.uint32)  # mx.argpartition leaves uint32

# Where a threadgroup's warp works, for every kernel here: its row block of a stack of n_rows-row matrices, for
# the pair (or token) GROUP_ID / blocks.
_PLACE = """
constexpr int M = 1;
const int row_words = w_shape[2];
const int K = row_words * 32 / BITS;
const int row_groups = K / GROUP;
const int blocks = (n_rows + ROWS * WARPS - 1) / (ROWS * WARPS);  // threadgroups per pair (or token)
const int first_row = (int(GROUP_ID) % blocks * WARPS + int(WARP)) * ROWS;
if (first_row >= n_rows) {
  return;  // the whole warp leaves together
}
"""

BODY = """
// x (X, K) T, w (E, N, K * BITS / 32) uint32, scales and biases (E, N, K / GROUP) T, experts (P) I -> y (P, N) T.
// Template: T, I, BITS, GROUP, SHARE (pairs per x row), ROWS (rows per warp), WARPS (warps per threadgroup).
// I is the experts' dtype: MLX names a CUDA build by its template values only, so each index dtype needs its own.
const int n_rows = w_shape[1];
""" + _PLACE + """
const int pair = int(GROUP_ID) / blocks;
const size_t expert = size_t(experts[pair]);
const GLOBAL uint32_t* w_rows = w + expert * n_rows * row_words;
const GLOBAL T* scale_rows = scales + expert * n_rows * row_groups;
const GLOBAL T* bias_rows = biases + expert * n_rows * row_groups;
const GLOBAL T* x_rows = x + size_t(pair / SHARE) * K;
GLOBAL T* y_rows = y + size_t(pair) * n_rows;
""" + qmatmul.ROWS_ACC + qmatmul.ROWS_STORE

KERNEL = Kernel("qwen_gather_qmv", ("x", "w", "scales", "biases", "experts"), ("y",), BODY)

SWIGLU_BODY = """
// x (X, K) T, w (E, 2 * N, K * BITS / 32) uint32 (gate rows, then up rows), scales and biases (E, 2 * N, K / GROUP)
// T, experts (P) I -> y (P, N) T = silu(x @ gate.T) * (x @ up.T). Template: as BODY's.
const int n_rows = w_shape[1] / 2;
""" + _PLACE + """
const int pair = int(GROUP_ID) / blocks;
const size_t expert = size_t(experts[pair]);
const GLOBAL uint32_t* gate_w = w + expert * 2 * n_rows * row_words;
const GLOBAL T* gate_scales = scales + expert * 2 * n_rows * row_groups;
const GLOBAL T* gate_biases = biases + expert * 2 * n_rows * row_groups;
const GLOBAL T* x_rows = x + size_t(pair / SHARE) * K;
GLOBAL T* y_rows = y + size_t(pair) * n_rows;
""" + qmatmul.swiglu_rows(("gate_w", "gate_scales", "gate_biases"),
                          ("gate_w + size_t(n_rows) * row_words", "gate_scales + size_t(n_rows) * row_groups",
                           "gate_biases + size_t(n_rows) * row_groups"))

SWIGLU_KERNEL = Kernel("qwen_gather_qmv_swiglu", ("x", "w", "scales", "biases", "experts"), ("y",), SWIGLU_BODY)

SUM_BODY = """
// x (P, K) T, w (E, N, K * BITS / 32) uint32, scales and biases (E, N, K / GROUP) T, experts (P) I, weights (P)
// float -> y (P / TOP, N) T. Template: T, I, BITS, GROUP, TOP (pairs per token), ROWS, WARPS.
const int n_rows = w_shape[1];
""" + _PLACE + """
const int token = int(GROUP_ID) / blocks;
float total[ROWS];
UNROLL for (int r = 0; r < ROWS; r++) {
  total[r] = 0.0f;
}
for (int j = 0; j < TOP; j++) {
  const int pair = token * TOP + j;
  const size_t expert = size_t(experts[pair]);
  const GLOBAL uint32_t* w_rows = w + expert * n_rows * row_words;
  const GLOBAL T* scale_rows = scales + expert * n_rows * row_groups;
  const GLOBAL T* bias_rows = biases + expert * n_rows * row_groups;
  const GLOBAL T* x_rows = x + size_t(pair) * K;
""" + qmatmul.ROWS_ACC + """
  const float weight = weights[pair];
  UNROLL for (int r = 0; r < ROWS; r++) {
    total[r] += weight * acc[0][r];
  }
}
GLOBAL T* y_rows = y + size_t(token) * n_rows;
UNROLL for (int r = 0; r < ROWS; r++) {
  const float sum = WARP_SUM(total[r]);
  if (int(LANE) == r && first_row + r < n_rows) {
    y_rows[first_row + r] = static_cast<T>(sum);
  }
}
"""

SUM_KERNEL = Kernel("qwen_gather_qmv_sum", ("x", "w", "scales", "biases", "experts", "weights"), ("y",), SUM_BODY)


def pairs_per_x_row(x: mx.array, experts: mx.array) -> int | None:
    """SHARE: 1 when x (..., 1, K) has a row per pair (batch shape = experts' shape), experts.shape[-1] when a row
    serves each token's experts (batch shape = experts' shape with its last axis 1); None for other shapes."""
    batch = x.shape[:-2]
    if batch == experts.shape:
        return 1
    if experts.ndim > 0 and batch == (*experts.shape[:-1], 1):
        return experts.shape[-1]
    return None


def supports(x: mx.array, w: mx.array, biases: mx.array | None, experts: mx.array, group_size: int, bits: int,
             mode: str) -> bool:
    """Whether the kernel covers this gathered product; anything else goes to mx.gather_qmm."""
    if mode != "affine" or biases is None or bits not in qmatmul.BITS or group_size not in qmatmul.GROUP_SIZES:
        return False
    if x.dtype not in qmatmul.DTYPES or experts.dtype not in INDEX_DTYPES or w.ndim != 3 or x.ndim < 2:
        return False
    if not in_device_memory(w, biases):  # held in GLOBAL pointers, as qmatmul's (experts is only indexed)
        return False
    if not 0 < experts.size <= MAX_PAIRS or x.shape[-2] != 1 or pairs_per_x_row(x, experts) is None:
        return False
    k = x.shape[-1]
    return k == w.shape[2] * 32 // bits and k % qmatmul.values_per_step(bits) == 0


def launch(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, experts: mx.array, group_size: int,
           bits: int) -> Launch:
    """The call computing x (..., 1, K) @ W[experts].T -> (*experts.shape, 1, N) (see `supports`)."""
    return _pairs_launch(x, w, scales, biases, experts, group_size, bits, w.shape[1])


def launch_swiglu(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, experts: mx.array,
                  group_size: int, bits: int) -> Launch:
    """The call computing silu(g) * u for [g, u] = x (..., 1, K) @ W[experts].T on the joined gate/up stack W
    (E, 2 * N, K) -> (*experts.shape, 1, N) (see `supports`; W's rows even)."""
    return _pairs_launch(x, w, scales, biases, experts, group_size, bits, w.shape[1] // 2)


def _pairs_launch(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, experts: mx.array,
                  group_size: int, bits: int, n: int) -> Launch:
    """A call over (pair, block of n output rows): BODY's or SWIGLU_BODY's."""
    k = x.shape[-1]
    pairs, share = experts.size, pairs_per_x_row(x, experts)
    blocks = -(-n // (qmatmul.ROWS * qmatmul.WARPS))
    return Launch(
        inputs=[x.reshape(pairs // share, k), w, scales.astype(x.dtype), biases.astype(x.dtype),
                experts.reshape(pairs)],
        template=[("T", x.dtype), ("I", experts.dtype), ("BITS", bits), ("GROUP", group_size), ("SHARE", share),
                  ("ROWS", qmatmul.ROWS), ("WARPS", qmatmul.WARPS)],
        grid=(pairs * blocks * qmatmul.WARPS * 32, 1, 1),
        threadgroup=(qmatmul.WARPS * 32, 1, 1),
        output_shapes=[(*experts.shape, 1, n)],
        output_dtypes=[x.dtype],
    )


def launch_sum(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, experts: mx.array, weights: mx.array,
               group_size: int, bits: int) -> Launch:
    """The call computing sum over j of weights[..., j] * (x[..., j, 0, :] @ W[experts[..., j]].T) for x
    (..., k, 1, K) with a row per pair, experts and weights (..., k) -> (..., N) (see `supports`, and `sums`)."""
    n, k, top = w.shape[1], x.shape[-1], experts.shape[-1]
    pairs = experts.size
    blocks = -(-n // (qmatmul.ROWS * qmatmul.WARPS))
    return Launch(
        inputs=[x.reshape(pairs, k), w, scales.astype(x.dtype), biases.astype(x.dtype), experts.reshape(pairs),
                weights.reshape(pairs).astype(mx.float32)],
        template=[("T", x.dtype), ("I", experts.dtype), ("BITS", bits), ("GROUP", group_size), ("TOP", top),
                  ("ROWS", qmatmul.ROWS), ("WARPS", qmatmul.WARPS)],
        grid=(pairs // top * blocks * qmatmul.WARPS * 32, 1, 1),
        threadgroup=(qmatmul.WARPS * 32, 1, 1),
        output_shapes=[(*experts.shape[:-1], n)],
        output_dtypes=[x.dtype],
    )


def sums(x: mx.array, experts: mx.array, weights: mx.array) -> bool:
    """Whether x has a row per pair and weights one per pair, as SUM_KERNEL needs."""
    return pairs_per_x_row(x, experts) == 1 and weights.shape == experts.shape
