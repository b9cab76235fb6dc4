// Stand-in for MLX's mlx/backend/cuda/device/utils.cuh (shipped inside libmlx, not as a file): what the wrapper
// MLX writes around a custom kernel uses from it, so nvcc can compile that wrapper here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/cstdint>
#include <cuda/std/limits>

#define MAX_NDIM 10
#define WARP_SIZE 32

namespace mlx::core::cu {

using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;

}  // namespace mlx::core::cu
