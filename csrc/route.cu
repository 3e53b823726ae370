// Fused expert routing: scores, group selection, top-k, renormalisation, a warp per token.
// The same algorithm and the same float32 operations as moekernels/kernels/_route.py, so ids
// are bit-identical and weights equal to rounding (see moekernels/reference.py).
//
// Layout: a token gets a segment of LANES lanes (8 for E <= 8, so 4 tokens share a warp; else
// the whole warp), and lane l of it holds the VPT consecutive experts l*VPT .. l*VPT + VPT - 1,
// loaded 16 bytes at a time where the row allows. Shuffles are the cost that matters: with
// strided experts and 64-bit keys in every reduction (commit 4d93921) a DeepSeek-V3 token took
// ~320 warp shuffles, and T = 40,000 took 195 us on an H200; this layout takes 83 us (01310c1),
// still issue-bound (ncu: 83% SM throughput, 11% of DRAM bandwidth). Here:
// - a group of 32 experts is 4 neighbouring lanes (VPT = 8), so every group's top-2 is a local
//   top-2 and two xor-shuffle steps, for all groups at once;
// - a group's rank is counted by each lane against the n_group group scores (n_group shuffles);
// - each top-k pick is one float max over the segment (5 shuffles), a ballot for the lowest lane
//   holding it (lower lanes hold lower ids, and a lane scans its slots in order: ties go to the
//   lower id), and two shuffles for the winner's slot and score.
// Resources: tests/test_cuda_ext.py asserts no local memory in any instantiation.
// Non-finite logits follow moekernels/reference.py's policy: sanitize() as a logit is loaded
// (NaN -> -inf, +inf -> FLT_MAX), and a row of -inf takes 0 as its softmax maximum (0 / 0 = NaN
// weights, as every backend gives).
#include "common.cuh"

namespace moekernels {
namespace {

constexpr int kThreads = 128;

// Two 32-bit words -> float values, per logits dtype (a 16-byte load holds 4, 8 or 8 values).
__device__ __forceinline__ void unpack(uint32_t w, float* out, float) { out[0] = __uint_as_float(w); }
__device__ __forceinline__ void unpack(uint32_t w, float* out, __nv_bfloat16) {
  out[0] = __uint_as_float(w << 16);
  out[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack(uint32_t w, float* out, __half) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// NaN -> -inf, +inf -> FLT_MAX (reference.sanitize_logits); a compare, a select and a min.
__device__ __forceinline__ float sanitize(float v) { return v != v ? -INFINITY : fminf(v, 3.4028234663852886e38f); }

template <typename T, int VPT>
__device__ __forceinline__ void load_row(const T* row, int first, int num_experts, float (&x)[VPT]) {
  constexpr int kPerWord = 4 / sizeof(T);
  constexpr int kPerVec = 4 * kPerWord;  // values per 16-byte load
  if constexpr (VPT % kPerVec == 0) {
    if (first + VPT <= num_experts && reinterpret_cast<uintptr_t>(row + first) % 16 == 0) {
#pragma unroll
      for (int c = 0; c < VPT / kPerVec; ++c) {
        const uint4 v = *reinterpret_cast<const uint4*>(row + first + c * kPerVec);
        unpack(v.x, &x[c * kPerVec + 0 * kPerWord], T());
        unpack(v.y, &x[c * kPerVec + 1 * kPerWord], T());
        unpack(v.z, &x[c * kPerVec + 2 * kPerWord], T());
        unpack(v.w, &x[c * kPerVec + 3 * kPerWord], T());
      }
#pragma unroll
      for (int i = 0; i < VPT; ++i) x[i] = sanitize(x[i]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VPT; ++i) x[i] = first + i < num_experts ? sanitize(to_float(row[first + i])) : -INFINITY;
}

// Top-2 of a multiset, kept as (t1 >= t2); merging two keeps the top-2 of the four.
__device__ __forceinline__ void merge_top2(float& t1, float& t2, float o1, float o2) {
  const float lo = fminf(t1, o1);
  t1 = fmaxf(t1, o1);
  t2 = fmaxf(lo, fmaxf(t2, o2));
}

template <typename T, int VPT, int LANES>
__global__ void __launch_bounds__(kThreads) topk_routing_kernel(
    const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ weights,
    int32_t* __restrict__ ids, int64_t num_tokens, int num_experts, int64_t stride_t, int top_k,
    bool softmax, bool renormalize, int n_group, int topk_group, float scale, float denom_scale) {
  const int lane = threadIdx.x % LANES;
  const int seg_base = (threadIdx.x & 31) - lane;  // first warp lane of this token's segment
  const unsigned seg_mask = LANES == 32 ? kFullMask : ((1u << LANES) - 1u) << seg_base;
  const int64_t token = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / LANES;
  // No early return: every lane of the warp must reach the shuffles.
  const bool live = token < num_tokens;
  const int first = lane * VPT;

  float x[VPT], score[VPT], choice[VPT];
  load_row<T, VPT>(logits + (live ? token : 0) * stride_t, first, num_experts, x);

  if (softmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < VPT; ++i) m = fmaxf(m, x[i]);
    m = seg_max<LANES>(m);
    if (m == -INFINITY) m = 0.0f;  // all NaN / -inf: exp 0 everywhere, 0 / 0 weights
    // reference.softmax_scores: the exps scaled by 2**s (exact), their integer parts summed in
    // float64. Every partial sum is an integer <= 2**53, exact, so neither this loop's order nor
    // the shuffle tree's can change the bits; rounded once to float32.
    double sum = 0.0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      score[i] = __fmul_rn(exp_f32(__fsub_rn(x[i], m)), denom_scale);
      sum += static_cast<double>(floorf(score[i]));
    }
    const float denom = __double2float_rn(seg_sum<LANES>(sum));
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = __fdiv_rn(score[i], denom);
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_f32(-x[i])));
  }

  unsigned avail = 0;  // bit i: expert first + i may still be picked
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = first + i;
    // Without a bias rank the logits: softmax and sigmoid are monotone.
    choice[i] = bias != nullptr ? sanitize(__fadd_rn(score[i], e < num_experts ? bias[e] : 0.0f)) : x[i];
    if (e < num_experts) avail |= 1u << i;
  }

  if (n_group > 1) {
    const int group_size = num_experts / n_group;
    const int lanes_per_group = group_size / VPT;
    // A lane's experts all sit in one group when groups are whole, power-of-two lane runs
    // (DeepSeek-V3: 32 experts = 4 lanes of 8). Otherwise groups are tested by range: a
    // division per (expert, group) pair cost ~2,500 instructions per token at E = 256.
    const bool aligned = group_size % VPT == 0 && (lanes_per_group & (lanes_per_group - 1)) == 0;
    float my_group = -INFINITY;  // lane g < n_group: group g's score
    if (aligned) {  // every group's top-2 at once
      float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll
      for (int i = 0; i < VPT; ++i)
        if ((avail >> i) & 1u) merge_top2(t1, t2, choice[i], -INFINITY);
      for (int o = 1; o < lanes_per_group; o <<= 1)
        merge_top2(t1, t2, __shfl_xor_sync(kFullMask, t1, o), __shfl_xor_sync(kFullMask, t2, o));
      const float group_score = bias != nullptr ? __fadd_rn(t1, t2) : t1;
      my_group = __shfl_sync(kFullMask, group_score, seg_base + (lane % n_group) * lanes_per_group);
    } else {  // any other group size (DeepSeek-V2: 20 experts), a group at a time
      for (int g = 0; g < n_group; ++g) {
        const int lo = g * group_size - first, hi = lo + group_size;  // slots of group g
        float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll
        for (int i = 0; i < VPT; ++i)
          if (((avail >> i) & 1u) && i >= lo && i < hi) merge_top2(t1, t2, choice[i], -INFINITY);
#pragma unroll
        for (int o = LANES / 2; o > 0; o >>= 1)
          merge_top2(t1, t2, __shfl_xor_sync(kFullMask, t1, o), __shfl_xor_sync(kFullMask, t2, o));
        if (lane == g) my_group = bias != nullptr ? __fadd_rn(t1, t2) : t1;
      }
    }
    // Rank my group against every group: better score, or equal and a lower group id.
    const long long mine = pack_key(my_group, n_group - 1 - lane);
    int rank = 0;
    for (int h = 0; h < n_group; ++h)
      rank += pack_key(__shfl_sync(kFullMask, my_group, seg_base + h), n_group - 1 - h) > mine;
    const unsigned keep = __ballot_sync(kFullMask, lane < n_group && rank < topk_group) >> seg_base;
    if (avail != 0) {
      int g = first / group_size, end = (g + 1) * group_size - first;  // my first slot's group
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (i == end) {
          ++g;
          end += group_size;
        }
        if (((avail >> i) & 1u) && !((keep >> g) & 1u)) avail &= ~(1u << i);
      }
    }
  }

  // Pick j is kept by lane j of the segment when top_k <= LANES and stored once at the end, in
  // one coalesced store; storing each pick from lane 0 and reading it back to renormalise put a
  // global write-read round trip on every token's critical path.
  const bool in_regs = top_k <= LANES;
  float* out_w = weights + token * top_k;
  int32_t* out_id = ids + token * top_k;
  float total = 0.0f, my_w = 0.0f;
  int my_id = 0;
  for (int j = 0; j < top_k; ++j) {
    float best = -INFINITY, best_score = 0.0f;
    int slot = -1;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (((avail >> i) & 1u) && (slot < 0 || choice[i] > best)) {
        best = choice[i];
        best_score = score[i];
        slot = i;
      }
    }
    const float m = seg_max<LANES>(slot >= 0 ? best : -INFINITY);
    const unsigned hits = __ballot_sync(kFullMask, slot >= 0 && best == m) & seg_mask;
    const unsigned any = __ballot_sync(kFullMask, slot >= 0) & seg_mask;  // NaN choices
    const int src = __ffs(hits ? hits : any) - 1;  // the lowest lane: the lowest ids
    const int win_slot = __shfl_sync(kFullMask, slot, src);
    const float w = __shfl_sync(kFullMask, best_score, src);
    const int e = (src - seg_base) * VPT + win_slot;
    if ((threadIdx.x & 31) == src) avail &= ~(1u << slot);
    total = __fadd_rn(total, w);
    if (in_regs) {
      if (lane == j) {
        my_w = w;
        my_id = e;
      }
    } else if (live && lane == 0) {
      out_w[j] = renormalize ? w : __fmul_rn(w, scale);
      out_id[j] = e;
    }
  }
  const float norm = renormalize ? __fdiv_rn(scale, __fadd_rn(total, 1e-20f)) : scale;
  if (in_regs) {
    if (live && lane < top_k) {
      out_w[lane] = __fmul_rn(my_w, norm);
      out_id[lane] = my_id;
    }
    return;
  }
  if (renormalize) {
    __syncwarp();  // lane 0's stores above are read back by the whole segment
    if (live)
      for (int j = lane; j < top_k; j += LANES) out_w[j] = __fmul_rn(out_w[j], norm);
  }
}

template <typename T>
void launch(const void* logits, const float* bias, float* weights, int32_t* ids, int64_t num_tokens,
            int num_experts, int64_t stride_t, int top_k, bool softmax, bool renormalize, int n_group,
            int topk_group, float scale, cudaStream_t stream) {
  const T* in = static_cast<const T*>(logits);
  int log2_e = 0;  // ceil(log2 E): reference.denominator_scale = 2**(53 - ceil(log2 E))
  while ((1 << log2_e) < num_experts) ++log2_e;
  const float denom_scale = ldexpf(1.0f, 53 - log2_e);
#define MOEKERNELS_ROUTE(VPT, LANES)                                                           \
  topk_routing_kernel<T, VPT, LANES>                                                           \
      <<<static_cast<unsigned>((num_tokens * LANES + kThreads - 1) / kThreads), kThreads, 0,  \
         stream>>>(in, bias, weights, ids, num_tokens, num_experts, stride_t, top_k, softmax,  \
                   renormalize, n_group, topk_group, scale, denom_scale)
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

// For kernel_image() (bindings.cpp): one kernel of the binding; a .cu file's kernels share its archs.
const void* topk_routing_kernel_address() {
  return reinterpret_cast<const void*>(&topk_routing_kernel<float, 8, 32>);
}

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
  with_dtype(dtype, [&](auto tag) {
    launch<decltype(tag)>(in, b, w, id, num_tokens, num_experts, stride_t, top_k, softmax, renormalize, n_group,
                          topk_group, scale, s);
  });
  check_launch("topk_routing_kernel");
}

}  // namespace moekernels
