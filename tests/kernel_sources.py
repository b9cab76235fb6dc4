"""The full source text MLX 0.32.4 compiles for a custom kernel call, so the tests compile what the GPU would.

`mx.fast.cuda_kernel` (mlx/backend/cuda/custom_kernel.cpp) writes: a default header (MLX's device utils.cuh,
cooperative groups, an `inf` macro), our header, then `namespace mlx::core::cu {` a `__global__ void` function whose
parameters are the inputs (`const T* name`, plus `const __grid_constant__ Shape name_shape` when the body mentions
`name_shape`) and the outputs (`T* name`), template values as `constexpr` / `using` lines, then the body.
NVRTC compiles it for the device (sm_90 on an H100) with MLX's device headers on the include path.

`mx.fast.metal_kernel` (mlx/backend/metal/custom_kernel.cpp and fast.cpp) writes MLX's Metal utils.h, our header,
`template <...> [[kernel]] void name(...)` with each input as `const device T* name [[buffer(i)]]` (`constant`
when it has fewer than 8 elements), `name_shape` as `const constant int*`, the outputs as `device T*`, then one
parameter per Metal attribute whose name occurs in the body, the body, and an explicit instantiation.
"""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.kernels.dialect import Kernel, Launch, body, header

CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint32: "uint32_t",
              mx.int32: "int32_t"}
METAL_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.uint32: "uint32_t",
               mx.int32: "int32_t"}
METAL_ATTRIBUTES = {  # name -> type, in MLX's order
    "dispatch_quadgroups_per_threadgroup": "uint", "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3", "grid_origin": "uint3", "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint", "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint", "simdgroups_per_threadgroup": "uint", "thread_execution_width": "uint",
    "thread_index_in_quadgroup": "uint", "thread_index_in_simdgroup": "uint", "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3", "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3", "threadgroups_per_grid": "uint3", "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint", "threads_per_threadgroup": "uint3",
}
MAX_CONSTANT_ARRAY_SIZE = 8


def _template_hash(template) -> str:
    parts = []
    for _, value in template:
        if isinstance(value, bool):
            parts.append("t" if value else "f")
        elif isinstance(value, int):
            parts.append(str(value))
        else:
            parts.append(METAL_TYPES[value])
    return "".join(f"_{p}" for p in parts)


def cuda_source(kernel: Kernel, launch: Launch) -> str:
    source = body(kernel, "cuda")
    name = f"custom_kernel_{kernel.name}{_template_hash(launch.template)}"
    text = ('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
            "#define inf cuda::std::numeric_limits<float>::infinity()\n\n")
    text += header("cuda")
    text += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    params = []
    for arg, array in zip(kernel.inputs, launch.inputs):
        params.append(f"    const {CUDA_TYPES[array.dtype]}* {arg}")
        if array.ndim > 0:
            if f"{arg}_shape" in source:
                params.append(f"    const __grid_constant__ Shape {arg}_shape")
            if f"{arg}_strides" in source:
                params.append(f"    const __grid_constant__ Strides {arg}_strides")
            if f"{arg}_ndim" in source:
                params.append(f"    const __grid_constant__ int {arg}_ndim")
    for arg, dtype in zip(kernel.outputs, launch.output_dtypes):
        params.append(f"    {CUDA_TYPES[dtype]}* {arg}")
    text += f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
    for arg, value in launch.template:
        if isinstance(value, bool):
            text += f"  constexpr bool {arg} = {'true' if value else 'false'};\n"
        elif isinstance(value, int):
            text += f"  constexpr int {arg} = {value};\n"
        else:
            text += f"  using {arg} = {CUDA_TYPES[value]};\n"
    text += "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"
    return text


def metal_source(kernel: Kernel, launch: Launch, utils_header: str) -> str:
    """`utils_header` stands in for MLX's Metal utils.h (the real one on a Mac, a stub in the syntax check)."""
    source = body(kernel, "metal")
    values = ", ".join(str(int(v)) if isinstance(v, (bool, int)) else METAL_TYPES[v] for _, v in launch.template)
    name = f"custom_kernel_{kernel.name}" + ("_" + "_" + values.replace(", ", "_") if launch.template else "")
    for array in launch.inputs:
        name += "_" + METAL_TYPES[array.dtype] + ("s" if array.ndim == 0 else
                                                   "c" if array.size < MAX_CONSTANT_ARRAY_SIZE else "")
    for dtype in launch.output_dtypes:
        name += "_" + METAL_TYPES[dtype]
    text = utils_header + header("metal")
    kinds = {bool: "bool", int: "int"}
    if launch.template:
        text += "template <" + ", ".join(
            f"{kinds.get(type(v), 'typename')} {arg}" for arg, v in launch.template) + ">\n"
    params, index = [], 0
    for arg, array in zip(kernel.inputs, launch.inputs):
        space = "constant" if array.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if array.ndim == 0 else "*"
        params.append(f"  const {space} {METAL_TYPES[array.dtype]}{ref} {arg} [[buffer({index})]]")
        index += 1
        if array.ndim > 0:
            for suffix, ctype in (("shape", "int*"), ("strides", "int64_t*"), ("ndim", "int&")):
                if f"{arg}_{suffix}" in source:
                    params.append(f"  const constant {ctype} {arg}_{suffix} [[buffer({index})]]")
                    index += 1
    for arg, dtype in zip(kernel.outputs, launch.output_dtypes):
        params.append(f"  device {METAL_TYPES[dtype]}* {arg} [[buffer({index})]]")
        index += 1
    params += [f"  {ctype} {attr} [[{attr}]]" for attr, ctype in METAL_ATTRIBUTES.items() if attr in source]
    text += f"[[kernel]] void {name}(\n" + ",\n".join(params) + ") {\n" + source + "\n}\n"
    if not launch.template:
        return text
    text += (f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}<{values}>) '
             f"{name}<{values}>;\n")
    return text
