// Fused expert routing: scores, group selection, top-k, renormalisation, a warp per token.
// The same algorithm and the same float32 operations as moekernels/kernels/_route.py, so ids
// are bit-identical and weights equal to rounding (see moekernels/reference.py).
//
// Layout: a token gets a segment of LANES lanes (8 for E <= 8, so 4 tokens share a warp;
// else the whole warp), and lane l of it holds experts l, l + LANES, ... (VPT of them), so the
// loads of a logits row are coalesced. Groups (n_group <= LANES): lane g holds group g's score;
// a ballot turns the chosen groups into a bitmask every lane can test. Each expert's group is
// computed once: a division per (expert, group) pair cost ~2,500 instructions per token at
// DeepSeek-V3's 256 experts in 8 groups.
// Resources: see tests/test_cuda_ext.py, which asserts no local memory in any instantiation
// (ptxas -v at VPT = 8: ~90 registers, no shared memory).
#include "common.cuh"

namespace moekernels {
namespace {

constexpr int kThreads = 128;

template <int LANES>
__device__ __forceinline__ long long seg_max(long long v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) {  // xor by o < LANES stays inside the segment
    long long other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

template <int LANES>
__device__ __forceinline__ float seg_max(float v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

template <int LANES>
__device__ __forceinline__ double seg_sum(double v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T, int VPT, int LANES>
__global__ void __launch_bounds__(kThreads) topk_routing_kernel(
    const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ weights,
    int32_t* __restrict__ ids, int64_t num_tokens, int num_experts, int64_t stride_t, int top_k,
    bool softmax, bool renormalize, int n_group, int topk_group, float scale) {
  const int lane = threadIdx.x % LANES;
  const int seg_base = (threadIdx.x & 31) - lane;  // first lane of this token's segment
  const int64_t token = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / LANES;
  // No early return: every lane of the warp must reach the shuffles.
  const bool live = token < num_tokens;
  const T* row = logits + (live ? token : 0) * stride_t;

  float x[VPT], score[VPT];
  long long key[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + LANES * i;
    x[i] = e < num_experts ? to_float(row[e]) : -INFINITY;
  }

  if (softmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < VPT; ++i) m = fmaxf(m, x[i]);
    m = seg_max<LANES>(m);
    double sum = 0.0;  // float64, rounded once: the summation order cannot change the bits
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      score[i] = exp_f32(__fsub_rn(x[i], m));
      sum += static_cast<double>(score[i]);
    }
    const float denom = __double2float_rn(seg_sum<LANES>(sum));
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = __fdiv_rn(score[i], denom);
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_f32(-x[i])));
  }

#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + LANES * i;
    // Without a bias rank the logits: softmax and sigmoid are monotone.
    const float choice = bias != nullptr ? __fadd_rn(score[i], e < num_experts ? bias[e] : 0.0f) : x[i];
    key[i] = e < num_experts ? pack_key(choice, num_experts - 1 - e) : kNone;
  }

  if (n_group > 1) {
    const int group_size = num_experts / n_group;
    int gid[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) gid[i] = (lane + LANES * i) / group_size;
    long long my_group = kNone;
    for (int g = 0; g < n_group; ++g) {
      long long best = kNone;
#pragma unroll
      for (int i = 0; i < VPT; ++i)
        if (gid[i] == g && key[i] > best) best = key[i];
      best = seg_max<LANES>(best);
      float group_score = key_value(best);
      if (bias != nullptr) {  // DeepSeek-V3: the sum of the group's two best choices
        long long second = kNone;
#pragma unroll
        for (int i = 0; i < VPT; ++i)
          if (gid[i] == g && key[i] != best && key[i] > second) second = key[i];
        group_score = __fadd_rn(group_score, key_value(seg_max<LANES>(second)));
      }
      if (lane == g) my_group = pack_key(group_score, n_group - 1 - g);
    }
    bool kept = false;
    for (int r = 0; r < topk_group; ++r) {
      if (my_group == seg_max<LANES>(my_group)) {
        kept = true;
        my_group = kNone;
      }
    }
    const unsigned keep = __ballot_sync(kFullMask, kept) >> seg_base;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (key[i] != kNone && !((keep >> gid[i]) & 1u)) key[i] = kNone;
  }

  float* out_w = weights + token * top_k;
  int32_t* out_id = ids + token * top_k;
  float total = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    long long best = kNone;
#pragma unroll
    for (int i = 0; i < VPT; ++i) best = key[i] > best ? key[i] : best;
    best = seg_max<LANES>(best);
    const int e = num_experts - 1 - static_cast<int>(best & 0xffffffffll);
    float w = -1.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (key[i] == best) {  // exactly one lane, one slot
        w = score[i];
        key[i] = kNone;
      }
    }
    w = seg_max<LANES>(w);  // scores are >= 0: the owner's score wins
    total = __fadd_rn(total, w);
    if (live && lane == 0) {
      out_w[j] = renormalize ? w : __fmul_rn(w, scale);
      out_id[j] = e;
    }
  }
  if (renormalize) {
    __syncwarp();  // lane 0's stores above are read back by the whole segment
    const float norm = __fdiv_rn(scale, __fadd_rn(total, 1e-20f));
    if (live)
      for (int j = lane; j < top_k; j += LANES) out_w[j] = __fmul_rn(out_w[j], norm);
  }
}

template <typename T>
void launch(const void* logits, const float* bias, float* weights, int32_t* ids, int64_t num_tokens,
            int num_experts, int64_t stride_t, int top_k, bool softmax, bool renormalize, int n_group,
            int topk_group, float scale, cudaStream_t stream) {
  const T* in = static_cast<const T*>(logits);
#define MOEKERNELS_ROUTE(VPT, LANES)                                                           \
  topk_routing_kernel<T, VPT, LANES>                                                           \
      <<<static_cast<unsigned>((num_tokens * LANES + kThreads - 1) / kThreads), kThreads, 0,  \
         stream>>>(in, bias, weights, ids, num_tokens, num_experts, stride_t, top_k, softmax,  \
                   renormalize, n_group, topk_group, scale)
  if (num_experts <= 8) MOEKERNELS_ROUTE(1, 8);
  else if (num_experts <= 32) MOEKERNELS_ROUTE(1, 32);
  else if (num_experts <= 64) MOEKERNELS_ROUTE(2, 32);
  else if (num_experts <= 128) MOEKERNELS_ROUTE(4, 32);
  else if (num_experts <= 256) MOEKERNELS_ROUTE(8, 32);
  else if (num_experts <= 512) MOEKERNELS_ROUTE(16, 32);
  else MOEKERNELS_ROUTE(32, 32);
#undef MOEKERNELS_ROUTE
}

}  // namespace

void topk_routing(uintptr_t logits, int dtype, uintptr_t bias, uintptr_t weights, uintptr_t ids,
                  int64_t num_tokens, int num_experts, int64_t stride_t, int top_k, bool softmax,
                  bool renormalize, int n_group, int topk_group, float scale, uintptr_t stream) {
  // Shapes and dtypes were validated by the Python custom op (moekernels/route.py); these
  // guards only keep a direct caller from reading out of bounds.
  if (num_experts < 1 || num_experts > 1024) throw std::invalid_argument("num_experts must be in [1, 1024]");
  if (n_group < 1 || n_group > 32 || num_experts % n_group)
    throw std::invalid_argument("n_group must divide num_experts and be <= 32");
  if (top_k < 1 || top_k > num_experts) throw std::invalid_argument("top_k must be in [1, num_experts]");
  if (num_tokens == 0) return;
  const auto* b = reinterpret_cast<const float*>(bias);
  auto* w = reinterpret_cast<float*>(weights);
  auto* id = reinterpret_cast<int32_t*>(ids);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const void* in = reinterpret_cast<const void*>(logits);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      launch<float>(in, b, w, id, num_tokens, num_experts, stride_t, top_k, softmax, renormalize, n_group, topk_group, scale, s);
      break;
    case DType::kBFloat16:
      launch<__nv_bfloat16>(in, b, w, id, num_tokens, num_experts, stride_t, top_k, softmax, renormalize, n_group, topk_group, scale, s);
      break;
    case DType::kFloat16:
      launch<__half>(in, b, w, id, num_tokens, num_experts, stride_t, top_k, softmax, renormalize, n_group, topk_group, scale, s);
      break;
    default:
      throw std::invalid_argument("unsupported logits dtype code " + std::to_string(dtype));
  }
  check_launch("topk_routing_kernel");
}

}  // namespace moekernels
