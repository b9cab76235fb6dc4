"""Decode products of tokens with their routed experts' affine-quantized weights: y[p] = x[p // SHARE] @ W[e[p]].T.

W is a stack of E expert matrices (E, N, K) stored as `mx.quantize` leaves it (qmatmul.py describes the layout):
`w` (E, N, K * bits / 32) uint32, `scales` and `biases` (E, N, K / group_size). A pair p is one (token, expert)
entry of the routing `experts` (flattened); its x row is p // SHARE (SHARE = k when each token's row serves its k
experts, as for the experts' gate/up; 1 when each pair has its own row, as for down).

Each pair is a one-row qmatmul on the matrix its expert index selects: the same warp layout and inner loop
(qmatmul.ROWS_DOT, with M = 1), with the weight, scale and bias base pointers moved to that expert. Threadgroups
run over (pair, block of ROWS * WARPS rows), flattened into one grid axis, pair-major.
"""

from __future__ import annotations

import mlx.core as mx

from . import qmatmul
from .dialect import Kernel, Launch

MAX_PAIRS = 64  # 8 decode tokens x 8 experts; more pairs are a prefill: mx.gather_qmm's sorted matmul wins there
INDEX_DTYPES = (mx.int32, mx.uint32)  # mx.argpartition leaves uint32

BODY = """
// x (X, K) T, w (E, N, K * BITS / 32) uint32, scales and biases (E, N, K / GROUP) T, experts (P) I -> y (P, N) T.
// Template: T, I, BITS, GROUP, SHARE (pairs per x row), ROWS (rows per warp), WARPS (warps per threadgroup).
// I is the experts' dtype: MLX names a CUDA build by its template values only, so each index dtype needs its own.
constexpr int M = 1;
const int n_rows = w_shape[1];
const int row_words = w_shape[2];
const int K = row_words * 32 / BITS;
const int row_groups = K / GROUP;
const int blocks = (n_rows + ROWS * WARPS - 1) / (ROWS * WARPS);  // threadgroups per pair
const int pair = int(GROUP_ID) / blocks;
const int first_row = (int(GROUP_ID) % blocks * WARPS + int(WARP)) * ROWS;
if (first_row >= n_rows) {
  return;  // the whole warp leaves together
}
const size_t expert = size_t(experts[pair]);
const GLOBAL uint32_t* w_rows = w + expert * n_rows * row_words;
const GLOBAL T* scale_rows = scales + expert * n_rows * row_groups;
const GLOBAL T* bias_rows = biases + expert * n_rows * row_groups;
const GLOBAL T* x_rows = x + size_t(pair / SHARE) * K;
GLOBAL T* y_rows = y + size_t(pair) * n_rows;
""" + qmatmul.ROWS_DOT

KERNEL = Kernel("qwen_gather_qmv", ("x", "w", "scales", "biases", "experts"), ("y",), BODY)


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
    if not 0 < experts.size <= MAX_PAIRS or x.shape[-2] != 1 or pairs_per_x_row(x, experts) is None:
        return False
    k = x.shape[-1]
    return k == w.shape[2] * 32 // bits and k % qmatmul.values_per_step(bits) == 0


def launch(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, experts: mx.array, group_size: int,
           bits: int) -> Launch:
    """The call computing x (..., 1, K) @ W[experts].T -> (*experts.shape, 1, N) (see `supports`)."""
    n, k = w.shape[1], x.shape[-1]
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
