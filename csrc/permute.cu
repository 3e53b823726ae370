// Moving rows between token order [T, H] and expert-sorted order [T*k, H]: permute, the
// weighted combine (unpermute) and their backward. The same walk as
// moekernels/kernels/_permute.py: a block per token (grid-stride), its k sorted rows
// dest[t*k + j] staged in shared memory; a token's row is read once for its k copies, every
// output element has one writer, and sums run in order j = 0..k-1 in float32: deterministic,
// no atomics.
//
// Rows move 16 bytes per thread access when every row start is 16-byte aligned (the launcher
// checks the base pointers and the row strides), else one element per access. Row offsets are
// int64: T*k*H passes 2**31 at DeepSeek-V3 prefill sizes (65536 x 8 x 7168 = 3.8e9).
//
// Resources (ptxas -v, sm_90a): 256 threads a block; permute 32 registers, combine 30-32,
// unpermute_backward 39-43; shared memory 2 x kMaxTopK x 4 B = 512 B, plus 8 floats for the
// block reduction of unpermute's backward. tests/test_cuda_ext.py asserts no local memory.
#include <climits>
#include <initializer_list>

#include "common.cuh"

namespace moekernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTopK = 64;  // a token's dest indices and weights staged in shared memory
constexpr int kMaxBlocks = 1 << 20;  // grid-stride beyond: 2**20 blocks cover any GPU many times

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&f)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = to_float(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&f)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(f[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Stage token t's k sorted rows (and weights) for the whole block.
__device__ __forceinline__ void stage_pairs(int64_t t, int top_k, const int32_t* dest, const float* w,
                                            int32_t* s_dest, float* s_w) {
  __syncthreads();  // the previous token's values are no longer read
  if (threadIdx.x < top_k) {
    s_dest[threadIdx.x] = dest[t * top_k + threadIdx.x];
    s_w[threadIdx.x] = w != nullptr ? w[t * top_k + threadIdx.x] : 1.0f;
  }
  __syncthreads();
}

// permute: out[dest[t*k + j]] = x[t]. A copy, so the payload is moved as opaque words V (16 B,
// or the element's own width), whatever its dtype (fp8 included).
template <typename V>
__global__ void __launch_bounds__(kThreads) permute_kernel(const V* __restrict__ x, const int32_t* __restrict__ dest,
                                                           V* __restrict__ out, int64_t num_tokens, int top_k,
                                                           int64_t row_words, int64_t x_stride_words) {
  __shared__ int32_t s_dest[kMaxTopK];
  __shared__ float s_w[kMaxTopK];
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    stage_pairs(t, top_k, dest, nullptr, s_dest, s_w);
    const V* src = x + t * x_stride_words;
    for (int64_t c = threadIdx.x; c < row_words; c += kThreads) {
      const V v = src[c];
      for (int j = 0; j < top_k; ++j) out[static_cast<int64_t>(s_dest[j]) * row_words + c] = v;
    }
  }
}

// WEIGHTED (unpermute): out[t] = sum_j w[t, j] * y[dest[t*k + j]] over the pairs not dropped
// (dest < num_valid = offsets[E - 1]). Otherwise (permute's backward): out[t] = sum_j y[dest].
template <typename T, int VEC, bool WEIGHTED>
__global__ void __launch_bounds__(kThreads) combine_kernel(const T* __restrict__ y, const int32_t* __restrict__ dest,
                                                           const float* __restrict__ w,
                                                           const int32_t* __restrict__ offsets, int num_experts,
                                                           T* __restrict__ out, int64_t num_tokens, int top_k,
                                                           int64_t hidden, int64_t y_stride, int64_t out_stride) {
  __shared__ int32_t s_dest[kMaxTopK];
  __shared__ float s_w[kMaxTopK];
  const int32_t num_valid = WEIGHTED ? offsets[num_experts - 1] : INT_MAX;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    stage_pairs(t, top_k, dest, WEIGHTED ? w : nullptr, s_dest, s_w);
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < hidden; c += kThreads * VEC) {
      float acc[VEC] = {};
      for (int j = 0; j < top_k; ++j) {
        const int32_t d = s_dest[j];
        if (WEIGHTED && d >= num_valid) continue;  // a dropped pair adds nothing, inf or NaN included
        float v[VEC];
        load_floats<T, VEC>(y + static_cast<int64_t>(d) * y_stride + c, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += WEIGHTED ? s_w[j] * v[i] : v[i];
      }
      store_floats<T, VEC>(out + t * out_stride + c, acc);
    }
  }
}

// unpermute's backward, with g = grad_y: grad_sorted[dest[t*k + j]] = w[t, j] * g[t] and
// grad_w[t, j] = <g[t], y[dest[t*k + j]]>, both zero for dropped pairs. The dot is summed by each
// thread over its columns, then over the block (warp shuffles, then the 8 warp sums in order).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) unpermute_backward_kernel(
    const T* __restrict__ grad_y, const T* __restrict__ y, const int32_t* __restrict__ dest,
    const float* __restrict__ w, const int32_t* __restrict__ offsets, int num_experts, T* __restrict__ grad_sorted,
    float* __restrict__ grad_w, int64_t num_tokens, int top_k, int64_t hidden, int64_t gy_stride, int64_t y_stride,
    int64_t gs_stride) {
  __shared__ int32_t s_dest[kMaxTopK];
  __shared__ float s_w[kMaxTopK];
  __shared__ float s_part[kThreads / 32];
  const int32_t num_valid = offsets[num_experts - 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    stage_pairs(t, top_k, dest, w, s_dest, s_w);
    for (int j = 0; j < top_k; ++j) {
      const int32_t d = s_dest[j];
      const bool valid = d < num_valid;
      float dot = 0.0f;
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < hidden; c += kThreads * VEC) {
        float g[VEC], v[VEC] = {}, out[VEC];
        load_floats<T, VEC>(grad_y + t * gy_stride + c, g);
        if (valid) load_floats<T, VEC>(y + static_cast<int64_t>(d) * y_stride + c, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          out[i] = valid ? s_w[j] * g[i] : 0.0f;  // a select, not 0 * g: g may hold inf
          dot += g[i] * v[i];
        }
        store_floats<T, VEC>(grad_sorted + static_cast<int64_t>(d) * gs_stride + c, out);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(kFullMask, dot, o);
      if (lane == 0) s_part[warp] = dot;
      __syncthreads();
      if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int i = 0; i < kThreads / 32; ++i) sum += s_part[i];
        grad_w[t * top_k + j] = valid ? sum : 0.0f;
      }
      __syncthreads();  // s_part is reused by the next pair
    }
  }
}

int blocks_for(int64_t num_tokens) { return static_cast<int>(num_tokens < kMaxBlocks ? num_tokens : kMaxBlocks); }

bool aligned16(std::initializer_list<uintptr_t> ptrs, std::initializer_list<int64_t> byte_strides) {
  for (uintptr_t p : ptrs)
    if (p % 16) return false;
  for (int64_t s : byte_strides)
    if (s % 16) return false;
  return true;
}

void check_pairs(int64_t num_tokens, int top_k, int64_t hidden) {
  if (num_tokens < 0 || hidden < 0) throw std::invalid_argument("num_tokens and hidden must be >= 0");
  if (top_k < 1 || top_k > kMaxTopK) throw std::invalid_argument("top_k must be in [1, 64]");
}

template <typename T, bool WEIGHTED>
void launch_combine(uintptr_t y, uintptr_t dest, uintptr_t w, uintptr_t offsets, int num_experts, uintptr_t out,
                    int64_t num_tokens, int top_k, int64_t hidden, int64_t y_stride, int64_t out_stride,
                    cudaStream_t s) {
  constexpr int kVec = 16 / sizeof(T);
  const auto* yp = reinterpret_cast<const T*>(y);
  const auto* dp = reinterpret_cast<const int32_t*>(dest);
  const auto* wp = reinterpret_cast<const float*>(w);
  const auto* op = reinterpret_cast<const int32_t*>(offsets);
  auto* outp = reinterpret_cast<T*>(out);
  const int64_t it = sizeof(T);
  if (aligned16({y, out}, {hidden * it, y_stride * it, out_stride * it}))
    combine_kernel<T, kVec, WEIGHTED><<<blocks_for(num_tokens), kThreads, 0, s>>>(
        yp, dp, wp, op, num_experts, outp, num_tokens, top_k, hidden, y_stride, out_stride);
  else
    combine_kernel<T, 1, WEIGHTED><<<blocks_for(num_tokens), kThreads, 0, s>>>(
        yp, dp, wp, op, num_experts, outp, num_tokens, top_k, hidden, y_stride, out_stride);
}

template <bool WEIGHTED>
void combine(uintptr_t y, int dtype, uintptr_t dest, uintptr_t w, uintptr_t offsets, int num_experts, uintptr_t out,
             int64_t num_tokens, int top_k, int64_t hidden, int64_t y_stride, int64_t out_stride, uintptr_t stream) {
  check_pairs(num_tokens, top_k, hidden);
  if (WEIGHTED && num_experts < 1) throw std::invalid_argument("num_experts must be >= 1");
  if (num_tokens == 0 || hidden == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto go = [&](auto tag) {
    launch_combine<decltype(tag), WEIGHTED>(y, dest, w, offsets, num_experts, out, num_tokens, top_k, hidden,
                                            y_stride, out_stride, s);
  };
  with_dtype(dtype, go);
  check_launch("combine_kernel");
}

template <typename T, int VEC>
void launch_unpermute_backward(uintptr_t grad_y, uintptr_t y, uintptr_t dest, uintptr_t w, uintptr_t offsets,
                               int num_experts, uintptr_t grad_sorted, uintptr_t grad_w, int64_t num_tokens, int top_k,
                               int64_t hidden, int64_t gy_stride, int64_t y_stride, int64_t gs_stride, cudaStream_t s) {
  unpermute_backward_kernel<T, VEC><<<blocks_for(num_tokens), kThreads, 0, s>>>(
      reinterpret_cast<const T*>(grad_y), reinterpret_cast<const T*>(y), reinterpret_cast<const int32_t*>(dest),
      reinterpret_cast<const float*>(w), reinterpret_cast<const int32_t*>(offsets), num_experts,
      reinterpret_cast<T*>(grad_sorted), reinterpret_cast<float*>(grad_w), num_tokens, top_k, hidden, gy_stride,
      y_stride, gs_stride);
}

template <typename T>
void unpermute_backward_typed(uintptr_t grad_y, uintptr_t y, uintptr_t dest, uintptr_t w, uintptr_t offsets,
                              int num_experts, uintptr_t grad_sorted, uintptr_t grad_w, int64_t num_tokens, int top_k,
                              int64_t hidden, int64_t gy_stride, int64_t y_stride, int64_t gs_stride, cudaStream_t s) {
  const int64_t it = sizeof(T);
  if (aligned16({grad_y, y, grad_sorted}, {hidden * it, gy_stride * it, y_stride * it, gs_stride * it}))
    launch_unpermute_backward<T, 16 / sizeof(T)>(grad_y, y, dest, w, offsets, num_experts, grad_sorted, grad_w,
                                                 num_tokens, top_k, hidden, gy_stride, y_stride, gs_stride, s);
  else
    launch_unpermute_backward<T, 1>(grad_y, y, dest, w, offsets, num_experts, grad_sorted, grad_w, num_tokens, top_k,
                                    hidden, gy_stride, y_stride, gs_stride, s);
}

template <typename V>
void launch_permute(uintptr_t x, const int32_t* dest, uintptr_t out, int64_t num_tokens, int top_k, int64_t row_words,
                    int64_t stride_words, cudaStream_t s) {
  permute_kernel<V><<<blocks_for(num_tokens), kThreads, 0, s>>>(reinterpret_cast<const V*>(x), dest,
                                                                reinterpret_cast<V*>(out), num_tokens, top_k,
                                                                row_words, stride_words);
}

}  // namespace

// For kernel_image() (bindings.cpp): one kernel of each binding; a .cu file's kernels share its archs.
const void* permute_kernel_address() { return reinterpret_cast<const void*>(&permute_kernel<uint4>); }
const void* unpermute_kernel_address() {
  return reinterpret_cast<const void*>(&combine_kernel<__nv_bfloat16, 8, true>);
}
const void* permute_backward_kernel_address() {
  return reinterpret_cast<const void*>(&combine_kernel<__nv_bfloat16, 8, false>);
}
const void* unpermute_backward_kernel_address() {
  return reinterpret_cast<const void*>(&unpermute_backward_kernel<__nv_bfloat16, 8>);
}

void permute(uintptr_t x, int itemsize, uintptr_t dest, uintptr_t out, int64_t num_tokens, int top_k, int64_t hidden,
             int64_t x_stride, uintptr_t stream) {
  check_pairs(num_tokens, top_k, hidden);
  if (num_tokens == 0 || hidden == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* dp = reinterpret_cast<const int32_t*>(dest);
  const int64_t row_bytes = hidden * itemsize, stride_bytes = x_stride * itemsize;
  // Words of 16 bytes when every row start is 16-byte aligned, else of one element.
  if (aligned16({x, out}, {row_bytes, stride_bytes})) {
    launch_permute<uint4>(x, dp, out, num_tokens, top_k, row_bytes / 16, stride_bytes / 16, s);
    check_launch("permute_kernel");
    return;
  }
  switch (itemsize) {
    case 1: launch_permute<uint8_t>(x, dp, out, num_tokens, top_k, hidden, x_stride, s); break;
    case 2: launch_permute<uint16_t>(x, dp, out, num_tokens, top_k, hidden, x_stride, s); break;
    case 4: launch_permute<uint32_t>(x, dp, out, num_tokens, top_k, hidden, x_stride, s); break;
    case 8: launch_permute<uint64_t>(x, dp, out, num_tokens, top_k, hidden, x_stride, s); break;
    default: throw std::invalid_argument("unsupported itemsize " + std::to_string(itemsize));
  }
  check_launch("permute_kernel");
}

void unpermute(uintptr_t y, int dtype, uintptr_t dest, uintptr_t w, uintptr_t offsets, int num_experts, uintptr_t out,
               int64_t num_tokens, int top_k, int64_t hidden, int64_t y_stride, int64_t out_stride, uintptr_t stream) {
  combine<true>(y, dtype, dest, w, offsets, num_experts, out, num_tokens, top_k, hidden, y_stride, out_stride, stream);
}

void permute_backward(uintptr_t grad, int dtype, uintptr_t dest, uintptr_t out, int64_t num_tokens, int top_k,
                      int64_t hidden, int64_t grad_stride, int64_t out_stride, uintptr_t stream) {
  combine<false>(grad, dtype, dest, 0, 0, 1, out, num_tokens, top_k, hidden, grad_stride, out_stride, stream);
}

void unpermute_backward(uintptr_t grad_y, uintptr_t y, int dtype, uintptr_t dest, uintptr_t w, uintptr_t offsets,
                        int num_experts, uintptr_t grad_sorted, uintptr_t grad_w, int64_t num_tokens, int top_k,
                        int64_t hidden, int64_t gy_stride, int64_t y_stride, int64_t gs_stride, uintptr_t stream) {
  check_pairs(num_tokens, top_k, hidden);
  if (num_experts < 1) throw std::invalid_argument("num_experts must be >= 1");
  if (num_tokens == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto go = [&](auto tag) {
    unpermute_backward_typed<decltype(tag)>(grad_y, y, dest, w, offsets, num_experts, grad_sorted, grad_w, num_tokens,
                                            top_k, hidden, gy_stride, y_stride, gs_stride, s);
  };
  with_dtype(dtype, go);
  check_launch("unpermute_backward_kernel");
}

}  // namespace moekernels
