"""Several quantized projections of one x in one launch: fewer launches per decode token.

At decode MLX spends ≈ 5–6 µs per op on a GPU whatever its size, so two kernels here replace five ops per layer:

- PARTS: x @ W_i.T for 2 or 3 matrices of one input and one quantization (Q, K and V): one launch, one output each.
  Threadgroups run over part 0's row blocks, then part 1's, ...; each warp is a qmatmul warp on its part's rows.
- SWIGLU: silu(x @ G.T) * (x @ U.T) for the MLP's gate and up (same shape and quantization): each warp computes the
  same rows of both matrices and applies the activation on the float sums; one output, (M, N).

The inner loop is qmatmul's (qmatmul.ROWS_ACC), so the layout, bits, group sizes, dtypes and M ≤ 8 are qmatmul's.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from qwen_mlx.kernels import qmatmul
from qwen_mlx.kernels.dialect import Kernel, Launch

MAX_PARTS = 3


def _pick(values: list[str]) -> str:
    """`part == 0 ? v0 : part == 1 ? v1 : v2` for the values of each part."""
    text = values[-1]
    for i in reversed(range(len(values) - 1)):
        text = f"part == {i} ? {values[i]} : ({text})"
    return text


@functools.cache
def parts_kernel(parts: int) -> Kernel:
    """The kernel for x @ W_i.T, i < parts: inputs x, w0, scales0, biases0, w1, ... -> outputs y0, y1, ..."""
    inputs = ("x", *(f"{name}{i}" for i in range(parts) for name in ("w", "scales", "biases")))
    blocks = [f"(w{i}_shape[0] + ROWS * WARPS - 1) / (ROWS * WARPS)" for i in range(parts)]  # row blocks per part
    firsts = ["0"] + [" + ".join(f"blocks{j}" for j in range(i)) for i in range(1, parts)]
    body = """
// x (M, K) T; w<i> (N<i>, K * BITS / 32) uint32, scales<i> and biases<i> (N<i>, K / GROUP) T -> y<i> (M, N<i>) T.
// Template: T, BITS, GROUP, M, ROWS (rows per warp), WARPS (warps per threadgroup).
const int row_words = w0_shape[1];
const int K = row_words * 32 / BITS;
const int row_groups = K / GROUP;
""" + "".join(f"const int blocks{i} = {b};\n" for i, b in enumerate(blocks[:-1])) + f"""
const int group = int(GROUP_ID);
const int part = {" + ".join(f"(group >= {f})" for f in firsts[1:])};
const int n_rows = {_pick([f"w{i}_shape[0]" for i in range(parts)])};
const int first_row = ((group - ({_pick(firsts)})) * WARPS + int(WARP)) * ROWS;
if (first_row >= n_rows) {{
  return;  // the whole warp leaves together
}}
const GLOBAL uint32_t* w_rows = {_pick([f"w{i}" for i in range(parts)])};
const GLOBAL T* scale_rows = {_pick([f"scales{i}" for i in range(parts)])};
const GLOBAL T* bias_rows = {_pick([f"biases{i}" for i in range(parts)])};
const GLOBAL T* x_rows = x;
GLOBAL T* y_rows = {_pick([f"y{i}" for i in range(parts)])};
""" + qmatmul.ROWS_ACC + qmatmul.ROWS_STORE
    return Kernel(f"qwen_qmatmul_parts{parts}", inputs, tuple(f"y{i}" for i in range(parts)), body)


SWIGLU_BODY = """
// x (M, K) T; gate and up: w (N, K * BITS / 32) uint32, scales and biases (N, K / GROUP) T -> y (M, N) T.
// Template: T, BITS, GROUP, M, ROWS (rows per warp), WARPS (warps per threadgroup).
const int n_rows = gate_w_shape[0];
const int row_words = gate_w_shape[1];
const int K = row_words * 32 / BITS;
const int row_groups = K / GROUP;
const int first_row = (int(GROUP_ID) * WARPS + int(WARP)) * ROWS;
if (first_row >= n_rows) {
  return;  // the whole warp leaves together
}
const GLOBAL T* x_rows = x;
GLOBAL T* y_rows = y;
""" + qmatmul.swiglu_rows(("gate_w", "gate_scales", "gate_biases"), ("up_w", "up_scales", "up_biases"))

SWIGLU_KERNEL = Kernel("qwen_qmatmul_swiglu", ("x", "gate_w", "gate_scales", "gate_biases", "up_w", "up_scales",
                                               "up_biases"), ("y",), SWIGLU_BODY)

Matrix = tuple[mx.array, mx.array, mx.array]  # (w, scales, biases) as mx.quantize leaves them


def supports(x: mx.array, matrices: list[Matrix], group_size: int, bits: int) -> bool:
    """Whether one launch covers x's products with all `matrices` (affine, one quantization, one K; each matrix one
    that qmatmul takes, so none in Metal's constant address space: a part's pointer is chosen among them)."""
    if not 2 <= len(matrices) <= MAX_PARTS:
        return False
    if any(w.shape[1] != matrices[0][0].shape[1] for w, _, _ in matrices):
        return False
    return all(qmatmul.supports(x, w, b, group_size, bits, "affine") for w, _, b in matrices)


def _operands(x: mx.array, matrices: list[Matrix]) -> list[mx.array]:
    k = x.shape[-1]
    return [x.reshape(-1, k), *(a.astype(x.dtype) if i else a for w, s, b in matrices
                               for i, a in enumerate((w, s, b)))]


def _template(x: mx.array, group_size: int, bits: int, rows: int = qmatmul.ROWS) -> list:
    return [("T", x.dtype), ("BITS", bits), ("GROUP", group_size), ("M", x.size // x.shape[-1]), ("ROWS", rows),
            ("WARPS", qmatmul.WARPS)]


def swiglu_rows_per_warp(m: int) -> int:
    """SWIGLU holds two matrices' sums per row: above 4 rows of x, half qmatmul's rows per warp keep it in
    registers (nvcc sm_90 spilled at M = 8 with 4)."""
    return qmatmul.ROWS if m <= 4 else qmatmul.ROWS // 2


def launch_parts(x: mx.array, matrices: list[Matrix], group_size: int, bits: int) -> Launch:
    """The call computing [x (..., K) @ W_i.T -> (..., N_i)] (see `supports`)."""
    rows = qmatmul.ROWS * qmatmul.WARPS
    groups = sum(-(-w.shape[0] // rows) for w, _, _ in matrices)
    return Launch(
        inputs=_operands(x, matrices),
        template=_template(x, group_size, bits),
        grid=(groups * qmatmul.WARPS * 32, 1, 1),
        threadgroup=(qmatmul.WARPS * 32, 1, 1),
        output_shapes=[(*x.shape[:-1], w.shape[0]) for w, _, _ in matrices],
        output_dtypes=[x.dtype] * len(matrices),
    )


def launch_swiglu(x: mx.array, gate: Matrix, up: Matrix, group_size: int, bits: int) -> Launch:
    """The call computing silu(x @ G.T) * (x @ U.T) -> (..., N) for gate and up of one shape (see `supports`)."""
    n = gate[0].shape[0]
    rows = swiglu_rows_per_warp(x.size // x.shape[-1])
    groups = -(-n // (rows * qmatmul.WARPS))
    return Launch(
        inputs=_operands(x, [gate, up]),
        template=_template(x, group_size, bits, rows),
        grid=(groups * qmatmul.WARPS * 32, 1, 1),
        threadgroup=(qmatmul.WARPS * 32, 1, 1),
        output_shapes=[(*x.shape[:-1], n)],
        output_dtypes=[x.dtype],
    )
