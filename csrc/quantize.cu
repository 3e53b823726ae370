// FP8 (e4m3) per-token-group quantization, (1, 128) blocks, optionally fused with permute: the
// same q and scale, bit for bit, as moekernels/kernels/_fp8.py and the reference.
//
// A warp takes one (row, 128-column group): 4 columns a lane, |x|'s max by a warp reduction
// (exact), scale = max(amax, 1e-12) / 448 with an IEEE division (__fdiv_rn, as div_rn in the
// Triton kernel and torch's division), rounded up to a power of two by its exponent bits with
// pow2, then q = x / scale (__fdiv_rn) clamped to +-448 and converted by the hardware's
// round-to-nearest-even e4m3 conversion (satfinite): on an e4m3 grid value and its ties, the
// rounding of torch and of the Triton kernel's explicit round_e4m3.
// PERMUTE: token t's row is read and quantized once, and its q and scales written to the k
// rows dest[t*k + j] of the expert-sorted order (the Triton kernel gathers row r from
// x[source[r] // k]: the same rows, as dest and source are inverse permutations).
// Non-finite input is a data error: a group holding a NaN or an inf gets the NaN scale (the
// canonical 0x7fc00000) and all its q NaN (0x7f), as the reference. |x| enters the warp max
// with NaN mapped to inf (abs_or_inf): fmaxf drops NaN but keeps inf. The clamp of q keeps the
// NaN that x / NaN gives (fmaxf(NaN, -448) would be -448).
// The scale [rows, groups] is written with its strides: row-major, or column-major (the GEMMs'
// fast layout, one 128-column group's scales contiguous).
// VEC: the 4 columns of a lane in one 8-byte (16-bit types) or 16-byte (float32) load, and q
// in one 4-byte store, when every row start is aligned (the launcher checks) and H % 4 == 0.
//
// Resources (ptxas -v, sm_90a): 256 threads a block (8 groups), no shared memory, no local
// memory; 29-32 registers, 40-44 fused with permute with 4-column vectors.
#include <cfloat>
#include <cuda_fp8.h>

#include "common.cuh"

namespace moekernels {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 128;  // columns per scale: DeepSeek-V3's activation blocks
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-12f;  // an all-zero group: a finite, positive scale, and q = 0

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, bool VEC>
__device__ __forceinline__ void load4(const T* row, int64_t c0, int64_t hidden, float (&v)[4]) {
  if (VEC && c0 + 4 <= hidden) {
    const Vec<T, 4> pk = *reinterpret_cast<const Vec<T, 4>*>(row + c0);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = to_float(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = c0 + i < hidden ? to_float(row[c0 + i]) : 0.0f;
  }
}

__device__ __forceinline__ float abs_or_inf(float v) {
  const float a = fabsf(v);
  return a <= FLT_MAX ? a : __int_as_float(0x7f800000);  // NaN <= FLT_MAX is false
}

__device__ __forceinline__ float group_scale(float amax, bool pow2) {
  float s = __fdiv_rn(fmaxf(amax, kAmaxFloor), kFp8Max);
  if (pow2) {
    const int bits = __float_as_int(s);
    s = (bits & 0x7fffff) ? __int_as_float(((bits >> 23) + 1) << 23) : s;
  }
  return amax <= FLT_MAX ? s : __int_as_float(0x7fc00000);
}

template <typename T, bool VEC, bool PERMUTE>
__global__ void __launch_bounds__(kThreads) quantize_1x128_kernel(const T* __restrict__ x,
                                                                  const int32_t* __restrict__ dest,
                                                                  uint8_t* __restrict__ q, float* __restrict__ scale,
                                                                  int64_t scale_row_stride, int64_t scale_col_stride,
                                                                  int64_t num_rows, int top_k, int64_t hidden,
                                                                  int64_t x_stride, bool pow2) {
  const int lane = threadIdx.x % 32;
  const int64_t groups = (hidden + kGroup - 1) / kGroup;
  const int64_t items = num_rows * groups;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; item < items;
       item += warps) {
    const int64_t t = item / groups, g = item % groups;
    const int64_t c0 = g * kGroup + lane * 4;
    float v[4];
    load4<T, VEC>(x + t * x_stride, c0, hidden, v);
    float amax = fmaxf(fmaxf(abs_or_inf(v[0]), abs_or_inf(v[1])), fmaxf(abs_or_inf(v[2]), abs_or_inf(v[3])));
    amax = seg_max<32>(amax);
    const float s = group_scale(amax, pow2);
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float d = __fdiv_rn(v[i], s);
      const float r = d == d ? fminf(fmaxf(d, -kFp8Max), kFp8Max) : d;
      const uint32_t byte = __nv_cvt_float_to_fp8(r, __NV_SATFINITE, __NV_E4M3);
      packed |= byte << (8 * i);
    }
    for (int j = 0; j < (PERMUTE ? top_k : 1); ++j) {
      const int64_t row = PERMUTE ? static_cast<int64_t>(dest[t * top_k + j]) : t;
      uint8_t* out = q + row * hidden;
      if (VEC && c0 + 4 <= hidden) {
        *reinterpret_cast<uint32_t*>(out + c0) = packed;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (c0 + i < hidden) out[c0 + i] = static_cast<uint8_t>(packed >> (8 * i));
        }
      }
      if (lane == 0) scale[row * scale_row_stride + g * scale_col_stride] = s;
    }
  }
}

}  // namespace

// For kernel_image() (bindings.cpp): one kernel of the binding; a .cu file's kernels share its archs.
const void* quantize_fp8_1x128_kernel_address() {
  return reinterpret_cast<const void*>(&quantize_1x128_kernel<__nv_bfloat16, true, false>);
}

void quantize_fp8_1x128(uintptr_t x, int dtype, uintptr_t dest, uintptr_t q, uintptr_t scale,
                        int64_t scale_row_stride, int64_t scale_col_stride, int64_t num_rows, int top_k,
                        int64_t hidden, int64_t x_stride, bool pow2, bool vec, uintptr_t stream) {
  // Shapes and dtypes were validated by the Python custom op (moekernels/fp8.py); these guards
  // only keep a direct caller from reading out of bounds.
  if (top_k < 1) throw std::invalid_argument("quantize_fp8_1x128: top_k must be >= 1");
  if (num_rows < 0 || hidden < 0) throw std::invalid_argument("quantize_fp8_1x128: negative num_rows or hidden");
  if (vec && hidden % 4) throw std::invalid_argument("quantize_fp8_1x128: vec needs hidden % 4 == 0");
  const int64_t items = num_rows * ((hidden + kGroup - 1) / kGroup);
  if (items == 0) return;
  const int64_t blocks = (items + kThreads / 32 - 1) / (kThreads / 32);
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* idx = reinterpret_cast<const int32_t*>(dest);
  auto* out = reinterpret_cast<uint8_t*>(q);
  auto* sc = reinterpret_cast<float*>(scale);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* in = reinterpret_cast<const T*>(x);
    auto go = [&](auto vec_tag, auto permute_tag) {
      quantize_1x128_kernel<T, decltype(vec_tag)::value, decltype(permute_tag)::value>
          <<<grid, kThreads, 0, s>>>(in, idx, out, sc, scale_row_stride, scale_col_stride, num_rows, top_k, hidden,
                                     x_stride, pow2);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (vec) {
      if (idx != nullptr) go(Yes(), Yes()); else go(Yes(), No());
    } else {
      if (idx != nullptr) go(No(), Yes()); else go(No(), No());
    }
  });
  check_launch("quantize_1x128_kernel");
}

}  // namespace moekernels
