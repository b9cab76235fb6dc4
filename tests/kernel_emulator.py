"""Runs a kernel's own body text on the CPU, compiled by the host C++ compiler: a GPU stand-in for the tests.

The dialect's words get a third meaning (EMULATOR_PRELUDE): each thread of a threadgroup is a std::thread,
`WARP_SUM`/`WARP_MAX` meet the warp's 32 threads at a barrier and reduce the 32 values, `GROUP_ID`/`WARP`/`LANE`
come from the thread's place, `AS_FLOAT` is a bit copy, float math is <cmath>'s. The threads run the threadgroups one after
another, each warp at its own pace (warps never wait for each other here, as in the kernels; a warp's lanes must
leave a body together, as the kernels make them: a lone early lane would leave its warp waiting forever). The
body is exactly the text Metal and CUDA compile (without their preludes), so the indexing, the packed-bit decoding,
masking of partial blocks, the reductions and the fused arithmetic are what run here; the memory model, the
precision of the GPUs' fast math and everything about speed are not. Inputs are passed as MLX's CUDA build passes
them (`const T* name`, plus `name_shape` when the body uses it); bfloat16 is a 16-bit struct with round-to-nearest-
even conversion, float16 is `_Float16`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.kernels.dialect import Kernel, Launch

EMULATOR_PRELUDE = """\
#define GROUP_ID emu_group
#define WARP (emu_thread / 32)
#define LANE (emu_thread % 32)
#define WARP_SUM(v) emu_warp_sum(v)
#define WARP_MAX(v) emu_warp_max(v)
#define GLOBAL
#define AS_FLOAT(u) emu_as_float(u)
#define RSQRT(x) (1.0f / std::sqrt(x))
#define COS(x) std::cos(x)
#define SIN(x) std::sin(x)
#define EXP(x) std::exp(x)
#define UNROLL
"""

HEADER = """\
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
using std::max;
using std::min;
// A GPU's 16- and 8-byte vector loads need an address aligned to their size (CUDA faults, Metal reads other
// bytes); x86 does not care, so each load of these types checks it and a misaligned one is recorded.
static std::atomic<int> emu_misaligned{0};
inline void emu_check_aligned(const void* p, uintptr_t size) {
  if (reinterpret_cast<uintptr_t>(p) % size != 0) emu_misaligned = 1;
}
struct uint4 {
  uint32_t x, y, z, w;
  uint4() = default;
  uint4(const uint4& o) { *this = o; }
  uint4& operator=(const uint4& o) {
    emu_check_aligned(&o, 16);
    std::memcpy(this, &o, 16);
    return *this;
  }
};
struct uint2 {
  uint32_t x, y;
  uint2() = default;
  uint2(const uint2& o) { *this = o; }
  uint2& operator=(const uint2& o) {
    emu_check_aligned(&o, 8);
    std::memcpy(this, &o, 8);
    return *this;
  }
};
extern "C" int emu_misaligned_loads() { return emu_misaligned.exchange(0); }
struct bf16 {
  uint16_t bits;
  bf16() = default;
  bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
struct Warp {
  std::barrier<> meet{32};
  float values[32];
};
static thread_local int emu_group, emu_thread;
static thread_local Warp* emu_warp;
inline float emu_warp_sum(float v) {  // in CUDA's butterfly order (dialect.CUDA_HEADER's shuffles)
  emu_warp->values[emu_thread % 32] = v;
  emu_warp->meet.arrive_and_wait();
  float level[32];
  for (int i = 0; i < 32; i++) level[i] = emu_warp->values[i];
  emu_warp->meet.arrive_and_wait();
  for (int step = 16; step > 0; step /= 2) {
    float next[32];
    for (int i = 0; i < 32; i++) next[i] = level[i] + level[i ^ step];
    for (int i = 0; i < 32; i++) level[i] = next[i];
  }
  return level[emu_thread % 32];
}
inline float emu_warp_max(float v) {
  emu_warp->values[emu_thread % 32] = v;
  emu_warp->meet.arrive_and_wait();
  float best = emu_warp->values[0];
  for (int i = 1; i < 32; i++) best = std::max(best, emu_warp->values[i]);
  emu_warp->meet.arrive_and_wait();
  return best;
}
inline float emu_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
"""

C_TYPES = {mx.float32: "float", mx.float16: "_Float16", mx.bfloat16: "bf16", mx.uint32: "uint32_t",
           mx.int32: "int32_t"}
NUMPY_TYPES = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.uint32: np.uint32,
               mx.int32: np.int32}


def available() -> bool:
    return shutil.which("g++") is not None


def _function(kernel: Kernel, launch: Launch, name: str) -> str:
    params = []
    for arg, array in zip(kernel.inputs, launch.inputs):
        params.append(f"const {C_TYPES[array.dtype]}* {arg}")
        if f"{arg}_shape" in kernel.body:
            params.append(f"const int* {arg}_shape")
    params += [f"{C_TYPES[d]}* {arg}" for arg, d in zip(kernel.outputs, launch.output_dtypes)]
    lines = []
    for arg, value in launch.template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {arg} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {arg} = {value};")
        else:
            lines.append(f"  using {arg} = {C_TYPES[value]};")
    call = ", ".join(
        [f"(const {C_TYPES[a.dtype]}*)inputs[{i}]" + (f", shapes[{i}]" if f"{arg}_shape" in kernel.body else "")
         for i, (arg, a) in enumerate(zip(kernel.inputs, launch.inputs))]
        + [f"({C_TYPES[d]}*)outputs[{i}]" for i, d in enumerate(launch.output_dtypes)])
    return f"""
static void {name}_body({", ".join(params)}) {{
{chr(10).join(lines)}
{EMULATOR_PRELUDE}{kernel.body}
}}
#include "emulator_undef.h"

extern "C" void {name}(void** inputs, int** shapes, void** outputs, int groups) {{
  std::vector<Warp> warps({launch.threadgroup[0] // 32});
  std::vector<std::thread> threads;
  for (int t = 0; t < {launch.threadgroup[0]}; t++) {{
    threads.emplace_back([&, t] {{
      emu_thread = t;
      emu_warp = &warps[t / 32];
      for (int group = 0; group < groups; group++) {{
        emu_group = group;
        {name}_body({call});
      }}
    }});
  }}
  for (auto& thread : threads) thread.join();
}}
"""


UNDEF = "".join(f"#undef {line.split()[1].split('(')[0]}\n" for line in EMULATOR_PRELUDE.splitlines())


# How the text is compiled: "O0" keeps every load and store where the text puts it; "O2" treats it as a GPU compiler
# may: type-based alias analysis (a type-punned read may see stale bytes) and a * b + c contracted to one FMA.
BUILDS = {"O0": ["-O0", "-fno-strict-aliasing"],
          "O2": ["-O2", "-fstrict-aliasing", "-ffp-contract=fast", "-march=native"]}
# MLX leaves a kernel's outputs uninitialised: they start as NaN (floats) or all ones (integers) here, so an output
# element the kernel never writes shows.
FILL = {mx.float32: np.nan, mx.float16: np.nan, mx.bfloat16: 0x7FC0, mx.uint32: 0xFFFFFFFF, mx.int32: -1}


def _as_numpy(a: mx.array) -> np.ndarray:
    a = mx.contiguous(a)
    return np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a))


def _misplaced(a: np.ndarray) -> np.ndarray:
    """A copy of `a` one element past a 16-byte boundary: a row-contiguous slice at an odd offset, which MLX hands
    to a kernel as it is."""
    raw = np.zeros(a.nbytes + 32, np.uint8)
    start = -raw.ctypes.data % 16 + a.itemsize
    placed = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    placed[...] = a
    return placed


def _library(source: str, build: str) -> ctypes.CDLL:
    """The source built once (kept under the temp directory, keyed by the text and the build)."""
    directory = Path(tempfile.gettempdir()) / "qwen_mlx_emulator"
    directory.mkdir(exist_ok=True)
    (directory / "emulator_undef.h").write_text(UNDEF)
    digest = hashlib.sha256((build + source).encode()).hexdigest()[:16]
    library = directory / f"kernels_{build}_{digest}.so"
    if not library.exists():
        cpp, partial = directory / f"kernels_{build}_{digest}.cpp", directory / f"{library.name}.{os.getpid()}"
        cpp.write_text(source)
        result = subprocess.run(["g++", "-std=c++20", *BUILDS[build], "-shared", "-fPIC", "-pthread", "-o",
                                 str(partial), str(cpp)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(result.stderr[-4000:])
        partial.rename(library)
    return ctypes.CDLL(str(library))


def run(calls: list[tuple[Kernel, Launch]], build: str = "O2", misaligned: tuple[str, ...] = ()) -> list[list[mx.array]]:
    """Each (kernel, launch) run on the CPU, all built as one translation unit: the outputs of each call. The inputs
    named in `misaligned` are placed one element past a 16-byte boundary; a 16- or 8-byte vector load from an
    address not aligned to its size raises."""
    for _, launch in calls:
        assert launch.grid[0] % launch.threadgroup[0] == 0 and launch.threadgroup[0] % 32 == 0
        assert launch.grid[1:] == (1, 1) and launch.threadgroup[1:] == (1, 1)
    # The grid is an argument, not part of the text, so that one build serves every size of a call.
    lib = _library(HEADER + "".join(_function(k, l, f"call{i}") for i, (k, l) in enumerate(calls)), build)
    results = []
    for i, (kernel, launch) in enumerate(calls):
        inputs = [_misplaced(_as_numpy(a)) if name in misaligned else _as_numpy(a)
                  for name, a in zip(kernel.inputs, launch.inputs)]
        shapes = [np.array(a.shape or (1,), np.int32) for a in launch.inputs]
        outputs = [np.full(s, FILL[d], NUMPY_TYPES[d]) for s, d in zip(launch.output_shapes, launch.output_dtypes)]
        pointers = lambda arrays: (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        groups = launch.grid[0] // launch.threadgroup[0]
        getattr(lib, f"call{i}")(pointers(inputs), pointers(shapes), pointers(outputs), ctypes.c_int(groups))
        if lib.emu_misaligned_loads():
            raise RuntimeError(f"{kernel.name}: a vector load from a misaligned address (inputs placed off their "
                               f"alignment: {', '.join(misaligned)}); a GPU faults or reads other bytes there")
        results.append([mx.array(o).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(o)
                        for o, d in zip(outputs, launch.output_dtypes)])
    return results
