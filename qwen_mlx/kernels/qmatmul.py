"""Affine-quantized x (M, K) @ W.T for small M (decode, small batches, drafts), in MLX's packed layout.

W is (N, K) stored as MLX's `mx.quantize` leaves it: `w` (N, K * bits / 32) uint32, value i of a row at bits
[bits * i, bits * (i + 1)) of the row's little-endian bit stream; `scales`, `biases` (N, K / group_size), and
W[n, k] = scales[n, g] * q + biases[n, g] with g = k // group_size.

Designed for memory bandwidth, as MLX's Metal `qmv_fast` and llama.cpp's mul_mv are: a 32-lane warp owns ROWS output
rows; each lane reads WORDS consecutive uint32 words of each row per step (one 16-byte load at 4 and 8 bits, 8 bytes
at 2), 32 or 16 values inside one group, so a warp's reads of a row are contiguous and each weight byte is read once.
Each lane keeps its slice of x in float registers and accumulates in float as scale * sum(q * x) + bias * sum(x)
per group, the sum(x) shared by the rows; the lanes' partial sums are added with one warp reduction per output at
the end. A packed value becomes a float without an integer conversion: its bits are or-ed into the mantissa of 2^23
and 2^23 is subtracted.
"""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.kernels.dialect import Kernel, Launch, in_device_memory
from qwen_mlx.quant_formats import QUANT_FORMATS

MAX_M = 8  # the largest M the kernel is built and checked for; larger M is a matrix product (MLX's tiled kernels)
# The largest M that dispatch hands this loop (qmatmul and the fused projections) on each GPU: the crossover with
# mx.quantized_matmul that scripts/device_check.py measures ("qmatmul_crossover" in its JSON; docs/kernels.md).
# Until measured, decode's M = 1 only: on sm_90 MLX runs M = 2..8 as a tensor-core qmm, likely faster.
DISPATCH_MAX_M = {"metal": 1, "cuda": 1}
ROWS = 4  # output rows per warp
WARPS = 2  # warps per threadgroup
BITS, GROUP_SIZES = QUANT_FORMATS["affine"]  # the kernel reads every affine format
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

# The product of ROWS rows of one quantized matrix with M rows of x, shared by every kernel of this package that
# reads quantized weights. ROWS_ACC leaves each lane's partial sums in acc[M][ROWS]; ROWS_STORE adds them over the
# warp and stores them. In scope:
#   w_rows (n_rows, row_words) uint32, scale_rows and bias_rows (n_rows, row_groups) T: the matrix;
#   x_rows (M, K) T; y_rows (M, n_rows) T: where row m's outputs go (ROWS_STORE);
#   first_row: the warp's first row (< n_rows); template BITS, GROUP, ROWS and a compile-time M.
ROWS_ACC = """
constexpr int WORDS = BITS == 2 ? 2 : (BITS == 3 || BITS == 6) ? 3 : BITS == 5 ? 5 : 4;  // words per lane per step
constexpr int VALS = WORDS * 32 / BITS;  // values per lane per step: 32 or 16, inside one group
constexpr uint32_t MASK = (1u << BITS) - 1u;

float acc[M][ROWS];
UNROLL for (int m = 0; m < M; m++) {
  UNROLL for (int r = 0; r < ROWS; r++) {
    acc[m][r] = 0.0f;
  }
}

for (int step = int(LANE); step < K / VALS; step += 32) {
  uint32_t words[ROWS][WORDS];
  float scale[ROWS];
  float bias[ROWS];
  UNROLL for (int r = 0; r < ROWS; r++) {
    // Rows past the end read the last row again; their sums are never stored. The vector loads of w are aligned:
    // w is an MLX buffer or a view of whole rows of one, and a row is a multiple of WORDS words (K % VALS == 0).
    const int row = min(first_row + r, n_rows - 1);
    const GLOBAL uint32_t* src = w_rows + size_t(row) * row_words + step * WORDS;
    if (WORDS == 4) {
      const uint4 v = *(const GLOBAL uint4*)(src);
      words[r][0] = v.x;
      words[r][1 % WORDS] = v.y;
      words[r][2 % WORDS] = v.z;
      words[r][3 % WORDS] = v.w;
    } else if (WORDS == 2) {
      const uint2 v = *(const GLOBAL uint2*)(src);
      words[r][0] = v.x;
      words[r][1 % WORDS] = v.y;
    } else {
      UNROLL for (int i = 0; i < WORDS; i++) {
        words[r][i] = src[i];
      }
    }
    const size_t g = size_t(row) * row_groups + step * VALS / GROUP;
    scale[r] = static_cast<float>(scale_rows[g]);
    bias[r] = static_cast<float>(bias_rows[g]);
  }

  UNROLL for (int m = 0; m < M; m++) {
    // x value by value, as MLX's qmv reads it: MLX passes a row-contiguous slice of x as it is, at any element
    // offset, where a vector load (which needs an address aligned to its size) would fault or read other bytes.
    const GLOBAL T* xsrc = x_rows + size_t(m) * K + step * VALS;
    float xs[VALS];
    UNROLL for (int i = 0; i < VALS; i++) {
      xs[i] = static_cast<float>(xsrc[i]);
    }
    float xsum = 0.0f;
    UNROLL for (int i = 0; i < VALS; i++) {
      xsum += xs[i];
    }
    UNROLL for (int r = 0; r < ROWS; r++) {
      float dot = 0.0f;
      UNROLL for (int i = 0; i < VALS; i++) {
        const int bit = i * BITS;
        const int word = bit / 32;
        const int shift = bit % 32;
        uint32_t q = words[r][word] >> shift;
        if (shift + BITS > 32) {  // the value straddles two words (3, 5 and 6 bits)
          q |= words[r][(word + 1) % WORDS] << ((32 - shift) % 32);
        }
        dot += (AS_FLOAT((q & MASK) | 0x4B000000u) - 8388608.0f) * xs[i];
      }
      acc[m][r] += scale[r] * dot + bias[r] * xsum;
    }
  }
}
"""

ROWS_STORE = """
UNROLL for (int m = 0; m < M; m++) {
  UNROLL for (int r = 0; r < ROWS; r++) {
    const float total = WARP_SUM(acc[m][r]);
    if (int(LANE) == (m * ROWS + r) % 32 && first_row + r < n_rows) {
      y_rows[size_t(m) * n_rows + first_row + r] = static_cast<T>(total);
    }
  }
}
"""

BODY = """
// x (M, K) T, w (N, K * BITS / 32) uint32, scales and biases (N, K / GROUP) T -> y (M, N) T.
// Template: T, BITS, GROUP, M, ROWS (rows per warp), WARPS (warps per threadgroup).
const int n_rows = w_shape[0];
const int row_words = w_shape[1];
const int K = row_words * 32 / BITS;
const int row_groups = K / GROUP;
const int first_row = (int(GROUP_ID) * WARPS + int(WARP)) * ROWS;
if (first_row >= n_rows) {
  return;  // the whole warp leaves together
}
const GLOBAL uint32_t* w_rows = w;
const GLOBAL T* scale_rows = scales;
const GLOBAL T* bias_rows = biases;
const GLOBAL T* x_rows = x;
GLOBAL T* y_rows = y;
""" + ROWS_ACC + ROWS_STORE

KERNEL = Kernel("qwen_qmatmul", ("x", "w", "scales", "biases"), ("y",), BODY)


def values_per_step(bits: int) -> int:
    """Values of a row one lane reads per step (the body's VALS); K must be a multiple."""
    words = {2: 2, 3: 3, 5: 5, 6: 3}.get(bits, 4)
    return words * 32 // bits


def dispatched(x: mx.array, backend: str) -> bool:
    """Whether x's row count is one that dispatch hands the kernel on `backend` (DISPATCH_MAX_M)."""
    return x.size <= DISPATCH_MAX_M[backend] * x.shape[-1]


def supports(x: mx.array, w: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str) -> bool:
    """Whether the kernel covers this product; anything else goes to mx.quantized_matmul. The body holds w, scales
    and biases (the size of scales) in GLOBAL pointers: each needs 8 elements or more (dialect.CONSTANT_BELOW)."""
    if mode != "affine" or biases is None or bits not in BITS or group_size not in GROUP_SIZES:
        return False
    if x.dtype not in DTYPES or w.ndim != 2 or x.size == 0 or not in_device_memory(w, biases):
        return False
    k = x.shape[-1]
    return x.size // k <= MAX_M and k == w.shape[1] * 32 // bits and k % values_per_step(bits) == 0


def launch(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> Launch:
    """The call computing x (..., K) @ W.T -> (..., N); x has at most MAX_M rows (see `supports`)."""
    n, k = w.shape[0], x.shape[-1]
    m = x.size // k
    groups = -(-n // (ROWS * WARPS))
    return Launch(
        inputs=[x.reshape(m, k), w, scales.astype(x.dtype), biases.astype(x.dtype)],
        template=[("T", x.dtype), ("BITS", bits), ("GROUP", group_size), ("M", m), ("ROWS", ROWS),
                  ("WARPS", WARPS)],
        grid=(groups * WARPS * 32, 1, 1),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[(*x.shape[:-1], n)],
        output_dtypes=[x.dtype],
    )


SWIGLU_STORE = """
UNROLL for (int m = 0; m < M; m++) {
  UNROLL for (int r = 0; r < ROWS; r++) {
    const float gate = WARP_SUM(gate_acc[m][r]);
    const float up = WARP_SUM(acc[m][r]);
    if (int(LANE) == (m * ROWS + r) % 32 && first_row + r < n_rows) {
      y_rows[size_t(m) * n_rows + first_row + r] = static_cast<T>(gate / (1.0f + EXP(-gate)) * up);
    }
  }
}
"""


def swiglu_rows(gate: tuple[str, str, str], up: tuple[str, str, str]) -> str:
    """Body text storing silu(x_rows @ G.T) * (x_rows @ U.T) for the warp's rows into y_rows: ROWS_ACC over the
    gate matrix, then over the up matrix, each given as the expressions of its (weights, scales, biases) row-0
    pointers; the activation is applied to the float sums, before anything is rounded to T."""
    def over(matrix: tuple[str, str, str], then: str) -> str:
        w, s, b = matrix
        return ("{\n"
                f"const GLOBAL uint32_t* w_rows = {w};\n"
                f"const GLOBAL T* scale_rows = {s};\n"
                f"const GLOBAL T* bias_rows = {b};\n" + ROWS_ACC + then + "}\n")

    keep = """
UNROLL for (int m = 0; m < M; m++) {
  UNROLL for (int r = 0; r < ROWS; r++) {
    gate_acc[m][r] = acc[m][r];
  }
}
"""
    return "float gate_acc[M][ROWS];\n" + over(gate, keep) + over(up, SWIGLU_STORE)
