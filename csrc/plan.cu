// The routing plan: a stable counting sort of the T*k (token, slot) pairs by expert, and the
// block-padded layout. The same outputs, bit for bit, as moekernels/kernels/_plan.py and the
// reference: expert_counts, expert_offsets, source_index (sorted by expert, ascending pair
// index within an expert, dropped pairs last), dest_index (its inverse), and with a block size
// padded_source_index, block_expert and num_padded_rows.
//
// A block takes a chunk of kChunk pairs; each of its 8 warps a contiguous eighth, in order.
// - One chunk (T*k <= 2048, every decode step): plan_scatter_kernel<SINGLE> alone: one launch.
// - More: plan_count_kernel (each chunk's histogram, shared-memory atomics: counts are
//   order-free), plan_scan_kernel (per key, the exclusive prefix over chunks in place and the
//   key's total; a block per 32 keys, its 8 warps on an eighth of the chunks each), then
//   plan_scatter_kernel, whose blocks each scan the E + 1 totals into the keys' first rows
//   (block 0 writes the expert offsets).
//   The scan was one block whose threads each walked every chunk for 4 keys: 4 x 256 dependent
//   steps at 512K pairs (256 chunks), tens of us. Now a thread walks 2 x 256 / 8 = 64 steps for
//   one key, in 33 blocks at E = 1024 (issue 13, item 7); the order and the bits are the same.
// The scatter ranks a warp's 32 pairs with __match_any_sync (peers with the same key) and the
// popcount of the lower peers, on top of per-warp cursors that start at the expert's start plus
// the earlier chunks' and warps' pairs: the order is the pair order, and the result the same on
// every run (no global atomics). An id outside [0, E) is key E, after every expert (dropped).
//
// Resources (ptxas -v, sm_90a; 256 threads a block, no local memory): count 23-25 registers and
// 4.1 KB of shared memory; scan 31 and 1 KB; scatter 32, and dynamic shared memory of 9 rows
// of E + 1 ints (8 warps' cursors and the totals), 36.9 KB at E = 1024; pad 32 and 4.1 KB.
#include "common.cuh"

namespace moekernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 2048;  // pairs per block: DeepSeek-V3 at T = 4096 (32768 pairs) is 16 blocks
constexpr int kPerWarp = kChunk / kWarps;
constexpr int kMaxExperts = 1024;
constexpr int kKeys = kMaxExperts + 1;  // the experts and the dropped

template <typename Id>
__device__ __forceinline__ int pair_key(const Id* ids, int64_t p, int num_experts) {
  const Id e = ids[p];
  return (e >= 0 && e < static_cast<Id>(num_experts)) ? static_cast<int>(e) : num_experts;
}

// In-place exclusive prefix sum of v[0, n) in shared memory, by warp 0 (n <= kKeys: 33 values a
// lane); every thread calls it and gets the total.
__device__ int exclusive_scan(int* v, int n) {
  __shared__ int total;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int per = (n + 31) / 32;
    const int lo = min(n, lane * per), hi = min(n, lo + per);
    int sum = 0;
    for (int i = lo; i < hi; ++i) sum += v[i];
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += y;
    }
    int run = incl - sum;
    for (int i = lo; i < hi; ++i) {
      const int c = v[i];
      v[i] = run;
      run += c;
    }
    if (lane == 31) total = incl;
  }
  __syncthreads();
  return total;
}

template <typename Id>
__global__ void __launch_bounds__(kThreads) plan_count_kernel(const Id* __restrict__ ids, int32_t* __restrict__ partial,
                                                              int64_t num_pairs, int num_experts) {
  __shared__ int hist[kKeys];
  const int keys = num_experts + 1;
  for (int e = threadIdx.x; e < keys; e += kThreads) hist[e] = 0;
  __syncthreads();
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kChunk;
  for (int i = threadIdx.x; i < kChunk; i += kThreads) {
    if (first + i < num_pairs) atomicAdd(&hist[pair_key(ids, first + i, num_experts)], 1);
  }
  __syncthreads();
  int32_t* row = partial + static_cast<int64_t>(blockIdx.x) * keys;
  for (int e = threadIdx.x; e < keys; e += kThreads) row[e] = hist[e];
}

// partial[c][key] -> the pairs of key in chunks before c, for c < num_chunks; partial[num_chunks]
// [key] <- the key's total (the dropped pairs' too), and counts[e] for the experts. Lane l of a
// block holds key 32 * blockIdx.x + l (a warp reads 128 contiguous bytes a chunk), and warp w
// the w-th eighth of the chunks: each warp sums its chunks, the warps' sums are scanned in
// shared memory, and each warp walks its chunks again writing the prefixes.
__global__ void __launch_bounds__(kThreads) plan_scan_kernel(int32_t* __restrict__ partial,
                                                             int32_t* __restrict__ counts, int64_t num_chunks,
                                                             int num_experts) {
  __shared__ int sums[kWarps][32];
  const int keys = num_experts + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key = blockIdx.x * 32 + lane;
  const bool ok = key < keys;
  const int64_t per = (num_chunks + kWarps - 1) / kWarps;
  const int64_t c0 = min(num_chunks, warp * per), c1 = min(num_chunks, c0 + per);
  int sum = 0;
  if (ok) {
    for (int64_t c = c0; c < c1; ++c) sum += partial[c * keys + key];
  }
  sums[warp][lane] = sum;
  __syncthreads();
  int run = 0, total = 0;
  for (int w = 0; w < kWarps; ++w) {
    const int v = sums[w][lane];
    run += w < warp ? v : 0;
    total += v;
  }
  if (ok) {
    for (int64_t c = c0; c < c1; ++c) {
      int32_t* p = partial + c * keys + key;
      const int v = *p;
      *p = run;
      run += v;
    }
    if (warp == kWarps - 1) {
      partial[num_chunks * keys + key] = total;
      if (key < num_experts) counts[key] = total;
    }
  }
}

// SINGLE: the block holds every pair and counts them itself. Dynamic shared memory: kWarps + 1
// rows of E + 1 ints.
template <typename Id, bool SINGLE>
__global__ void __launch_bounds__(kThreads) plan_scatter_kernel(const Id* __restrict__ ids,
                                                                const int32_t* __restrict__ partial,
                                                                int32_t* __restrict__ counts,
                                                                int32_t* __restrict__ offsets,
                                                                int32_t* __restrict__ source,
                                                                int32_t* __restrict__ dest, int64_t num_pairs,
                                                                int64_t num_chunks, int num_experts) {
  extern __shared__ int smem[];
  const int keys = num_experts + 1;
  int* cursor = smem;  // [kWarps][keys]: the next row of each key for each warp
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < kWarps * keys; i += kThreads) cursor[i] = 0;
  __syncthreads();
  const int64_t w0 = static_cast<int64_t>(blockIdx.x) * kChunk + warp * kPerWarp;
  for (int s = lane; s < kPerWarp; s += 32) {  // each warp's histogram (order-free)
    if (w0 + s < num_pairs) atomicAdd(&cursor[warp * keys + pair_key(ids, w0 + s, num_experts)], 1);
  }
  __syncthreads();
  int* total = smem + kWarps * keys;  // [keys]: the counts, then the keys' first rows
  for (int e = threadIdx.x; e < keys; e += kThreads) {  // exclusive prefix over the warps
    int run = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = cursor[w * keys + e];
      cursor[w * keys + e] = run;
      run += c;
    }
    if (SINGLE) {
      total[e] = run;
      if (e < num_experts) counts[e] = run;
    }
  }
  __syncthreads();  // the prefixes above and the bases below touch a column from different threads
  if (SINGLE) {
    exclusive_scan(total, keys);  // total[key] is now the key's first row
    for (int e = threadIdx.x; e < num_experts; e += kThreads) offsets[e] = total[e + 1];
    for (int i = threadIdx.x; i < kWarps * keys; i += kThreads) cursor[i] += total[i % keys];
  } else {
    // The keys' first rows, from the totals plan_scan_kernel left after the chunk rows: each block
    // scans the E + 1 totals itself (33 values a lane at E = 1024) rather than wait on another launch.
    for (int e = threadIdx.x; e < keys; e += kThreads) total[e] = partial[num_chunks * keys + e];
    exclusive_scan(total, keys);
    if (blockIdx.x == 0) {
      for (int e = threadIdx.x; e < num_experts; e += kThreads) offsets[e] = total[e + 1];
    }
    const int32_t* row = partial + static_cast<int64_t>(blockIdx.x) * keys;
    for (int i = threadIdx.x; i < kWarps * keys; i += kThreads) cursor[i] += row[i % keys] + total[i % keys];
  }
  __syncthreads();
  for (int s = 0; s < kPerWarp; s += 32) {  // 32 pairs a step, in pair order
    const int64_t p = w0 + s + lane;
    const bool ok = p < num_pairs;
    const unsigned active = __ballot_sync(kFullMask, ok);
    if (ok) {
      const int key = pair_key(ids, p, num_experts);
      const unsigned peers = __match_any_sync(active, key);
      const int rank = __popc(peers & ((1u << lane) - 1u));
      const int pos = cursor[warp * keys + key] + rank;
      source[pos] = static_cast<int32_t>(p);
      dest[p] = pos;
      __syncwarp(active);  // every peer has read the cursor before its lowest lane moves it
      if (rank == 0) cursor[warp * keys + key] += __popc(peers);
    }
    __syncwarp();
  }
}

// The block-padded layout: each expert's rows padded to a multiple of B with the sentinel N;
// block_expert[b] the expert of padded block b (-1 past the end); num_padded the rows in use.
__global__ void __launch_bounds__(kThreads) plan_pad_kernel(const int32_t* __restrict__ counts,
                                                            const int32_t* __restrict__ offsets,
                                                            const int32_t* __restrict__ source,
                                                            int32_t* __restrict__ padded,
                                                            int32_t* __restrict__ block_expert,
                                                            int32_t* __restrict__ num_padded, int64_t num_pairs,
                                                            int num_experts, int block_size, int64_t num_blocks) {
  __shared__ int pstart[kKeys];  // padded start of each expert; [E]: the padded total
  for (int e = threadIdx.x; e <= num_experts; e += kThreads) {
    pstart[e] = e < num_experts ? (counts[e] + block_size - 1) / block_size * block_size : 0;
  }
  const int total = exclusive_scan(pstart, num_experts + 1);
  if (blockIdx.x == 0 && threadIdx.x == 0) *num_padded = total;
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const int64_t row0 = b * block_size;
    // The expert: how many padded segments end at or before row0 (ends are pstart[1..E]).
    int lo = 0, hi = num_experts;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (pstart[mid + 1] <= row0) lo = mid + 1; else hi = mid;
    }
    const bool used = row0 < total;
    if (threadIdx.x == 0) block_expert[b] = used ? lo : -1;
    const int count = used ? counts[lo] : 0;
    const int first = used ? offsets[lo] - count : 0;
    const int64_t within0 = used ? row0 - pstart[lo] : 0;
    for (int r = threadIdx.x; r < block_size; r += kThreads) {
      const int64_t within = within0 + r;
      padded[row0 + r] = within < count ? source[first + within] : static_cast<int32_t>(num_pairs);
    }
  }
}

template <typename Id>
void launch_plan(uintptr_t ids, int64_t num_pairs, int num_experts, int block_size, uintptr_t partial,
                 uintptr_t counts, uintptr_t offsets, uintptr_t source, uintptr_t dest, uintptr_t padded,
                 uintptr_t block_expert, uintptr_t num_padded, int64_t num_blocks, cudaStream_t stream) {
  const Id* id = reinterpret_cast<const Id*>(ids);
  auto* cnt = reinterpret_cast<int32_t*>(counts);
  auto* off = reinterpret_cast<int32_t*>(offsets);
  auto* src = reinterpret_cast<int32_t*>(source);
  auto* dst = reinterpret_cast<int32_t*>(dest);
  auto* part = reinterpret_cast<int32_t*>(partial);
  const int keys = num_experts + 1;
  const int64_t chunks = (num_pairs + kChunk - 1) / kChunk;
  if (chunks == 1) {
    plan_scatter_kernel<Id, true><<<1, kThreads, (kWarps + 1) * keys * sizeof(int), stream>>>(
        id, part, cnt, off, src, dst, num_pairs, chunks, num_experts);
    check_launch("plan_scatter_kernel (single block)");
  } else {
    plan_count_kernel<Id><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(id, part, num_pairs, num_experts);
    check_launch("plan_count_kernel");
    plan_scan_kernel<<<(keys + 31) / 32, kThreads, 0, stream>>>(part, cnt, chunks, num_experts);
    check_launch("plan_scan_kernel");
    plan_scatter_kernel<Id, false><<<static_cast<unsigned>(chunks), kThreads, (kWarps + 1) * keys * sizeof(int),
                                     stream>>>(id, part, cnt, off, src, dst, num_pairs, chunks, num_experts);
    check_launch("plan_scatter_kernel");
  }
  if (block_size > 0 && num_blocks > 0) {
    const int grid = static_cast<int>(num_blocks < 4096 ? num_blocks : 4096);
    plan_pad_kernel<<<grid, kThreads, 0, stream>>>(cnt, off, src, reinterpret_cast<int32_t*>(padded),
                                                   reinterpret_cast<int32_t*>(block_expert),
                                                   reinterpret_cast<int32_t*>(num_padded), num_pairs, num_experts,
                                                   block_size, num_blocks);
    check_launch("plan_pad_kernel");
  }
}

}  // namespace

// For kernel_image() (bindings.cpp): one kernel of the binding; a .cu file's kernels share its archs.
const void* plan_routing_kernel_address() {
  return reinterpret_cast<const void*>(&plan_scatter_kernel<int32_t, true>);
}

int plan_chunk() { return kChunk; }

void plan_routing(uintptr_t ids, int id_itemsize, int64_t num_pairs, int num_experts, int block_size,
                  uintptr_t partial, uintptr_t counts, uintptr_t offsets, uintptr_t source, uintptr_t dest,
                  uintptr_t padded, uintptr_t block_expert, uintptr_t num_padded, int64_t num_blocks,
                  uintptr_t stream) {
  if (num_experts < 1 || num_experts > kMaxExperts) {
    throw std::invalid_argument("plan_routing: num_experts must be in [1, 1024], got " + std::to_string(num_experts));
  }
  if (id_itemsize != 4 && id_itemsize != 8) {
    throw std::invalid_argument("plan_routing: ids dtype must be int32 or int64 (itemsize 4 or 8), got itemsize " +
                                std::to_string(id_itemsize));
  }
  if (num_pairs < 0 || num_pairs >= (int64_t{1} << 31) - 1 || block_size < 0 || num_blocks < 0) {
    throw std::invalid_argument("plan_routing: num_pairs must be in [0, 2**31 - 1) and block_size >= 0");
  }
  if (num_pairs == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (id_itemsize == 4) {
    launch_plan<int32_t>(ids, num_pairs, num_experts, block_size, partial, counts, offsets, source, dest, padded,
                         block_expert, num_padded, num_blocks, s);
  } else {
    launch_plan<int64_t>(ids, num_pairs, num_experts, block_size, partial, counts, offsets, source, dest, padded,
                         block_expert, num_padded, num_blocks, s);
  }
}

}  // namespace moekernels
