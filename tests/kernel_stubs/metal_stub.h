// Stand-in for <metal_stdlib> and MLX's Metal utils.h, enough for clang to check a kernel's Metal build as C++:
// every Metal name the dialect's prelude and the wrapper MLX writes use, with Metal's signatures. Address spaces
// are clang address spaces, so a pointer that mixes them is an error here as it is in Metal.
#pragma once

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread

typedef __SIZE_TYPE__ size_t;
typedef unsigned int uint;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef _Float16 half;
typedef __bf16 bfloat;
typedef uint uint2 __attribute__((ext_vector_type(2)));
typedef uint uint3 __attribute__((ext_vector_type(3)));
typedef uint uint4 __attribute__((ext_vector_type(4)));

namespace metal {
template <typename T> T simd_sum(T);
template <typename T> T simd_max(T);
template <typename T> T min(T, T);
template <typename T> T max(T, T);
template <typename To, typename From> To as_type(From);
namespace precise {
float rsqrt(float);
float cos(float);
float sin(float);
float exp(float);
}  // namespace precise
}  // namespace metal

using namespace metal;  // as MLX's bf16.h does

typedef half float16_t;  // MLX's utils.h
typedef bfloat bfloat16_t;  // MLX's bf16.h on Metal 3.1 and later
