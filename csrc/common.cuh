// Shared by every kernel in csrc/: dtypes, launch checks, warp reductions, and the
// bit-exact float32 math of moekernels/reference.py (see its module docstring).
// No torch headers: the extension takes raw device pointers and a stream handle.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace moekernels {

// Codes shared with moekernels/_ext.py (DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// float -> T, rounded to nearest (as torch rounds).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Calls go(T()) with the C++ type of a DType code.
template <typename F>
void with_dtype(int dtype, F&& go) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: go(float()); break;
    case DType::kBFloat16: go(__nv_bfloat16()); break;
    case DType::kFloat16: go(__half()); break;
    default: throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype));
  }
}

constexpr unsigned kFullMask = 0xffffffffu;

// Reductions over a segment of LANES lanes (a power of two <= 32) of one warp: xor by
// o < LANES stays inside the segment, so each of a warp's 32 / LANES tokens reduces its own.
template <int LANES, typename V>
__device__ __forceinline__ V seg_max(V v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) {
    const V other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

template <int LANES>
__device__ __forceinline__ double seg_sum(double v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// exp(x) with the exact float32 operation sequence of reference.exp_f32 and
// kernels/_math.py::exp_f32. The __f*_rn intrinsics are never contracted into FMAs.
__device__ __forceinline__ float exp_f32(float x) {
  const float xc = fminf(fmaxf(x, -87.0f), 88.0f);
  const float n = floorf(__fadd_rn(__fmul_rn(xc, 1.4426950216293335f), 0.5f));
  const float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, 0.693359375f)), __fmul_rn(n, -0.00021219444170128554f));
  float p = __fadd_rn(__fmul_rn(r, 0.00019841270113829523f), 0.0013888889225199819f);
  p = __fadd_rn(__fmul_rn(p, r), 0.008333333767950535f);
  p = __fadd_rn(__fmul_rn(p, r), 0.0416666679084301f);
  p = __fadd_rn(__fmul_rn(p, r), 0.1666666716337204f);
  p = __fadd_rn(__fmul_rn(p, r), 0.5f);
  p = __fadd_rn(__fmul_rn(p, r), 1.0f);
  p = __fadd_rn(__fmul_rn(p, r), 1.0f);
  const float two_n = __int_as_float((static_cast<int>(n) + 127) << 23);
  const float y = __fmul_rn(p, two_n);
  if (x < -87.0f) return 0.0f;
  if (x > 88.0f) return __int_as_float(0x7f800000);
  return y;
}

// float -> int whose signed order is the float order; -0.0 is folded onto +0.0 first.
__device__ __forceinline__ int order_key(float v) {
  const int bits = __float_as_int(__fadd_rn(v, 0.0f));
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

// 64-bit ranking key: the value in the high half; `low` (count - 1 - index) breaks ties to the
// lower index, as the Triton kernel and the reference rank.
__device__ __forceinline__ long long pack_key(float v, int low) {
  return (static_cast<long long>(order_key(v)) << 32) | static_cast<unsigned>(low);
}

}  // namespace moekernels
