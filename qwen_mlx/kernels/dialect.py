"""One kernel source, two GPU languages: the macro vocabulary a kernel body is written in, and how it runs.

A body uses only these words beside plain C++ (loops, `constexpr`, `static_cast`, `uint32_t`, `uint4`, `uint2`):

    GROUP_ID          index of this threadgroup (CUDA block) along x
    WARP, LANE        simdgroup (warp) index within the threadgroup, lane within the simdgroup (32 wide on both)
    WARP_SUM(v)       float sum over the 32 lanes, every lane gets it
    WARP_MAX(v)       float maximum over the 32 lanes, every lane gets it
    GLOBAL            address space of kernel buffers, for pointer casts: `(const GLOBAL uint4*)(w + i)`
    AS_FLOAT(u)       the float whose bits are the uint32_t u
    RSQRT, COS, SIN, EXP   precise float math
    UNROLL            unroll the loop that follows completely (its bounds are compile-time constants)

Threadgroups are one-dimensional: grid (threads, 1, 1), threadgroup (threads per group, 1, 1), a multiple of 32.

Each backend puts its prelude (the #defines) at the top of the body: MLX's Metal path adds an attribute such as
`simdgroup_index_in_threadgroup` to the kernel signature only when that name occurs in the body text, so the
Metal prelude must live there, not in the header. Helper functions (C++ does not allow them inside a body) go in
the backend's header.

MLX compiles a custom kernel once per (kernel name, template values) and keeps it; every kernel here takes its
dtype as the template parameter `T`, so the cache key is (kernel, dtype, template values).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx

METAL_PRELUDE = """\
#define GROUP_ID threadgroup_position_in_grid.x
#define WARP simdgroup_index_in_threadgroup
#define LANE thread_index_in_simdgroup
#define WARP_SUM(v) metal::simd_sum(v)
#define WARP_MAX(v) metal::simd_max(v)
#define GLOBAL device
#define AS_FLOAT(u) as_type<float>(u)
#define RSQRT(x) metal::precise::rsqrt(x)
#define COS(x) metal::precise::cos(x)
#define SIN(x) metal::precise::sin(x)
#define EXP(x) metal::precise::exp(x)
#define UNROLL _Pragma("clang loop unroll(full)")
"""

CUDA_PRELUDE = """\
#define GROUP_ID blockIdx.x
#define WARP (threadIdx.x / 32)
#define LANE (threadIdx.x % 32)
#define WARP_SUM(v) qwen_warp_sum(v)
#define WARP_MAX(v) qwen_warp_max(v)
#define GLOBAL
#define AS_FLOAT(u) __uint_as_float(u)
#define RSQRT(x) rsqrtf(x)
#define COS(x) cosf(x)
#define SIN(x) sinf(x)
#define EXP(x) expf(x)
#define UNROLL _Pragma("unroll")
"""

CUDA_HEADER = """\
#ifndef QWEN_MLX_CUDA_HEADER
#define QWEN_MLX_CUDA_HEADER
__device__ inline float qwen_warp_sum(float v) {
  for (int step = 16; step > 0; step /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, step);
  }
  return v;
}
__device__ inline float qwen_warp_max(float v) {
  for (int step = 16; step > 0; step /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, step));
  }
  return v;
}
#endif
"""

METAL_HEADER = ""

BACKENDS = ("metal", "cuda")
# Metal passes an input of fewer elements in the constant address space (MLX's max_constant_array_size,
# mlx/backend/common/metal_kernel.cpp): a body may index such an input but not hold it in a GLOBAL pointer.
CONSTANT_BELOW = 8


def in_device_memory(*arrays: mx.array) -> bool:
    """Whether every array reaches a Metal kernel in the device address space (see CONSTANT_BELOW)."""
    return all(a.size >= CONSTANT_BELOW for a in arrays)


@dataclass(frozen=True)
class Kernel:
    """A kernel written once in the vocabulary above."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body: str


@dataclass
class Launch:
    """One call of a kernel: its arrays, template values, sizes and outputs."""

    inputs: list[mx.array]
    template: list[tuple[str, int | bool | mx.Dtype]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]


def header(backend: str) -> str:
    """The helper functions placed before the kernel function."""
    return {"metal": METAL_HEADER, "cuda": CUDA_HEADER}[backend]


def body(kernel: Kernel, backend: str) -> str:
    """The kernel body as that backend compiles it: its prelude, then the body."""
    return {"metal": METAL_PRELUDE, "cuda": CUDA_PRELUDE}[backend] + kernel.body


@functools.cache
def _compiled(kernel: Kernel, backend: str):
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(name=kernel.name, input_names=list(kernel.inputs), output_names=list(kernel.outputs),
                source=body(kernel, backend), header=header(backend))


def run(kernel: Kernel, backend: str, launch: Launch) -> list[mx.array]:
    """Run `kernel` on the GPU with `backend` ("metal" or "cuda")."""
    return _compiled(kernel, backend)(
        inputs=launch.inputs, template=launch.template, grid=launch.grid, threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes)
