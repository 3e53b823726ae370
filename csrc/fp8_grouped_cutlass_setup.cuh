// The device-side problem set-up of the CUTLASS FP8 grouped GEMMs (fp8_grouped_cutlass.cu, sm_90a, and
// fp8_grouped_cutlass_sm100.cu, sm_100a), the kernel that zeroes the rows past offs[-1], and the launch of a
// grouped kernel from the set-up (Grouped). Included by both files, so each arch's image has its own copy (each
// file is built for its one arch).
//
// The buffer, E experts (moekernels/_cutlass.py's setup_twin lays out and fills the same bytes):
//   shapes (M, N, K) int32 [E], padded to 16 bytes;
//   8 arrays of E 8-byte entries: pointers to A, B, D, SFA, SFB, and the one runtime stride of A, B and D (the
//   others are static 1 and 0): what both kernels' arguments take;
//   sm_100a alone: each expert's SFA layout [E], then its SFB layout [E] (Sm100's grouped collective reads a
//   layout an expert from the arguments; Sm90's derives it from the expert's shape, so it has none).
// Expert e's rows are [offs[e-1], offs[e]) (offs[-1] = 0): a, sfa and d start at that row, b and sfb at expert e.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"

namespace moekernels {
namespace {  // each including file (one arch each) keeps its own kernels: no symbol shared between their objects
namespace cutlass_setup {

constexpr int kArrays = 8;  // the 8-byte arrays after the shapes

__host__ __device__ inline int64_t shapes_bytes(int groups) { return (int64_t(groups) * 12 + 15) / 16 * 16; }
__host__ __device__ inline int64_t arrays_end(int groups) {
  return shapes_bytes(groups) + int64_t(kArrays) * 8 * groups;
}

template <class S>
__global__ void setup_kernel(const int32_t* __restrict__ offs, int groups, int n, int k, uint64_t a, uint64_t b,
                             uint64_t d, uint64_t sfa, uint64_t sfb, uint8_t* buf) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g < groups) S::write_entry(g, offs, groups, n, k, a, b, d, sfa, sfb, buf);
}

// One kernel's set-up: its problem shape and stride types, and ScaleConfig (void where the kernel takes no
// per-expert scale layouts: Sm90's).
template <class Shape3, class StrideA, class StrideB, class StrideD, class ScaleConfig>
struct Setup {
  static_assert(sizeof(Shape3) == 12, "GroupProblemShape's (M, N, K): 3 int32");
  static_assert(sizeof(StrideA) == 8 && sizeof(StrideB) == 8 && sizeof(StrideD) == 8,
                "the strides hold one int64 (row/column stride), the rest static");

  static int64_t bytes(int groups) {
    if constexpr (std::is_void_v<ScaleConfig>) {
      return arrays_end(groups);
    } else {
      return arrays_end(groups) + int64_t(groups) * (sizeof(decltype(ScaleConfig::deduce_layoutSFA())) +
                                                     sizeof(decltype(ScaleConfig::deduce_layoutSFB())));
    }
  }

  // Expert g's entries, from integer base addresses (a e4m3 [M, K], b e4m3 [E, N, K], d bf16 [M, N], sfa float32
  // [M, K/128], sfb float32 [E, N/128, K/128]): host and device code, so that the host writes the same bytes for
  // the tests (no GPU needed) as the set-up kernel on the device.
  __host__ __device__ static void write_entry(int g, const int32_t* offs, int groups, int n, int k, uint64_t a,
                                              uint64_t b, uint64_t d, uint64_t sfa, uint64_t sfb, uint8_t* buf) {
    const int64_t start = g == 0 ? 0 : offs[g - 1];
    // Clamped: a decreasing offs (a caller's error, not checked: that would be a host sync) makes an empty
    // expert rather than a negative M. moekernels/_cutlass.py's setup_twin does the same.
    const int64_t end = offs[g];
    const int rows = static_cast<int>(end > start ? end - start : 0);
    reinterpret_cast<Shape3*>(buf)[g] = Shape3(rows, n, k);
    auto* arr = reinterpret_cast<uint64_t*>(buf + shapes_bytes(groups));
    const int64_t kb = k / 128, nb = n / 128;
    arr[0 * groups + g] = a + start * k;  // e4m3: 1 byte an element
    arr[1 * groups + g] = b + int64_t(g) * n * k;
    arr[2 * groups + g] = d + start * n * 2;  // bf16
    arr[3 * groups + g] = sfa + start * kb * 4;  // float32
    arr[4 * groups + g] = sfb + int64_t(g) * nb * kb * 4;
    reinterpret_cast<StrideA*>(arr + 5 * groups)[g] = cutlass::make_cute_packed_stride(StrideA{}, {rows, k, 1});
    reinterpret_cast<StrideB*>(arr + 6 * groups)[g] = cutlass::make_cute_packed_stride(StrideB{}, {n, k, 1});
    reinterpret_cast<StrideD*>(arr + 7 * groups)[g] = cutlass::make_cute_packed_stride(StrideD{}, {rows, n, 1});
    if constexpr (!std::is_void_v<ScaleConfig>) {
      using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
      using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
      auto* layout_sfa = reinterpret_cast<LayoutSFA*>(buf + arrays_end(groups));
      auto* layout_sfb = reinterpret_cast<LayoutSFB*>(buf + arrays_end(groups) + int64_t(groups) * sizeof(LayoutSFA));
      layout_sfa[g] = ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(rows, n, k, 1));
      layout_sfb[g] = ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(rows, n, k, 1));
    }
  }

  static void launch(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b, uintptr_t d,
                     uintptr_t sfa, uintptr_t sfb, uintptr_t buf, uintptr_t stream) {
    if (groups <= 0) return;
    constexpr int kThreads = 128;
    setup_kernel<Setup><<<(groups + kThreads - 1) / kThreads, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const int32_t*>(offs), groups, static_cast<int>(n), static_cast<int>(k), a, b, d, sfa, sfb,
        reinterpret_cast<uint8_t*>(buf));
    check_launch("fp8_grouped_cutlass setup");
  }

  // The same bytes written on the host (offs and buf host memory).
  static void on_host(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b, uintptr_t d,
                      uintptr_t sfa, uintptr_t sfb, uintptr_t buf) {
    for (int g = 0; g < groups; ++g)
      write_entry(g, reinterpret_cast<const int32_t*>(offs), groups, static_cast<int>(n), static_cast<int>(k), a, b,
                  d, sfa, sfb, reinterpret_cast<uint8_t*>(buf));
  }
};

// Rows at or after offs[-1] belong to no expert and are zero (fp8_grouped_mm's contract): written here rather
// than the whole output zeroed first (a memset of M x N x 2 bytes, 6% of the GEMM at M 32768, N 4096, K 7168
// and 1,300 TFLOP/s). A fixed grid strides over the tail, 16 bytes a store (N % 128 == 0 keeps rows 16-byte
// aligned); with no tail each thread reads offs[-1] and exits.
__global__ void zero_tail_kernel(const int32_t* __restrict__ offs, int groups, int64_t m, int64_t n, uint4* d) {
  const int64_t start = min(max(int64_t(offs[groups - 1]), int64_t(0)), m) * n / 8;  // 8 bf16 a uint4
  const int64_t end = m * n / 8;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = start + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < end; i += step)
    d[i] = make_uint4(0, 0, 0, 0);
}

inline void launch_zero_tail(uintptr_t offs, int groups, int64_t m, int64_t n, uintptr_t d, int sm_count,
                             uintptr_t stream) {
  zero_tail_kernel<<<sm_count * 2, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const int32_t*>(offs), groups, m, n, reinterpret_cast<uint4*>(d));
  check_launch("fp8_grouped_mm_cutlass zero tail");
}

// One grouped kernel (Gemm: CUTLASS's GemmUniversalAdapter) with its arguments read from the set-up buffer, and
// its launch after the set-up and tail kernels. ScaleConfig: as Setup's (void: no per-expert scale layouts).
template <class Gemm, class ScaleConfig>
struct Grouped {
  using Kernel = typename Gemm::GemmKernel;
  using Shape3 = typename Kernel::ProblemShape::UnderlyingProblemShape;
  using S = Setup<Shape3, typename Kernel::InternalStrideA, typename Kernel::InternalStrideB,
                  typename Kernel::InternalStrideD, ScaleConfig>;

  static typename Gemm::Arguments arguments(int groups, uint8_t* buf, int sm_count) {
    auto* arr = reinterpret_cast<uint64_t*>(buf + shapes_bytes(groups));
    using Mainloop = typename Kernel::MainloopArguments;
    using Epilogue = typename Kernel::EpilogueArguments;
    Mainloop mainloop{};
    mainloop.ptr_A = reinterpret_cast<decltype(Mainloop::ptr_A)>(arr + 0 * groups);
    mainloop.ptr_B = reinterpret_cast<decltype(Mainloop::ptr_B)>(arr + 1 * groups);
    mainloop.ptr_SFA = reinterpret_cast<decltype(Mainloop::ptr_SFA)>(arr + 3 * groups);
    mainloop.ptr_SFB = reinterpret_cast<decltype(Mainloop::ptr_SFB)>(arr + 4 * groups);
    mainloop.dA = reinterpret_cast<decltype(Mainloop::dA)>(arr + 5 * groups);
    mainloop.dB = reinterpret_cast<decltype(Mainloop::dB)>(arr + 6 * groups);
    if constexpr (!std::is_void_v<ScaleConfig>) {  // else null: Sm90's collective derives them from the shapes
      uint8_t* layouts = buf + arrays_end(groups);
      mainloop.layout_SFA = reinterpret_cast<decltype(Mainloop::layout_SFA)>(layouts);
      mainloop.layout_SFB = reinterpret_cast<decltype(Mainloop::layout_SFB)>(
          layouts + int64_t(groups) * sizeof(decltype(ScaleConfig::deduce_layoutSFA())));
    }
    Epilogue epilogue{};  // no C: out = acc, and no source read
    epilogue.thread.alpha = 1.0f;
    epilogue.thread.beta = 0.0f;
    epilogue.ptr_D = reinterpret_cast<decltype(Epilogue::ptr_D)>(arr + 2 * groups);
    epilogue.dD = reinterpret_cast<decltype(Epilogue::dD)>(arr + 7 * groups);
    return {cutlass::gemm::GemmUniversalMode::kGrouped,
            {groups, reinterpret_cast<Shape3*>(buf), nullptr},  // no host shapes: the device's alone
            mainloop, epilogue, cutlass::KernelHardwareInfo{0, sm_count}};
  }

  // CUTLASS's own check of the arguments (host code: the op runs it before each launch, the tests without a
  // GPU): the grouped mode, the cluster and the scheduler. The row counts live on the device, so no host check
  // sees them: TMA bounds them. Returns the workspace's size.
  static int64_t workspace_bytes(const char* name, int groups, int sm_count) {
    const auto args = arguments(groups, nullptr, sm_count);  // no pointer is read
    const cutlass::Status status = Gemm::can_implement(args);
    if (status != cutlass::Status::kSuccess) {
      throw std::invalid_argument(std::string(name) + ": CUTLASS cannot implement it: " +
                                  cutlassGetStatusString(status));
    }
    return static_cast<int64_t>(Gemm::get_workspace_size(args));
  }

  // d: bf16 [m, n]; buf: S::bytes(groups) bytes, 16-aligned; workspace: workspace_bytes(groups, sm_count).
  static void run(const char* name, uintptr_t a, uintptr_t sfa, uintptr_t b, uintptr_t sfb, uintptr_t offs,
                  uintptr_t d, int groups, int64_t m, int64_t n, int64_t k, uintptr_t buf, uintptr_t workspace,
                  int sm_count, uintptr_t stream) {
    if (groups <= 0 || m <= 0) return;
    S::launch(offs, groups, n, k, a, b, d, sfa, sfb, buf, stream);
    launch_zero_tail(offs, groups, m, n, d, sm_count, stream);
    Gemm gemm;
    auto args = arguments(groups, reinterpret_cast<uint8_t*>(buf), sm_count);
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    cutlass::Status status = gemm.initialize(args, reinterpret_cast<void*>(workspace), s);
    if (status != cutlass::Status::kSuccess) {
      throw std::runtime_error(std::string(name) + ": initialize: " + cutlassGetStatusString(status));
    }
    status = gemm.run(s);
    if (status != cutlass::Status::kSuccess) {
      throw std::runtime_error(std::string(name) + ": run: " + cutlassGetStatusString(status));
    }
    check_launch(name);
  }
};

// Where a kernel built with ScaleConfig reads each scale block, in elements from the expert's scale pointer: the
// config's layouts for an (m, n, k) problem (the same tile_atom_to_shape_SFA/SFB the collectives and the set-up
// call). sfa: [m, k/128] int64, sfb: [n/128, k/128] int64, host memory.
template <class ScaleConfig>
void scale_offsets(int m, int n, int k, uintptr_t sfa, uintptr_t sfb) {
  const auto la = ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(m, n, k, 1));
  const auto lb = ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(m, n, k, 1));
  auto* oa = reinterpret_cast<int64_t*>(sfa);
  auto* ob = reinterpret_cast<int64_t*>(sfb);
  const int kb = (k + 127) / 128, nb = (n + 127) / 128;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < kb; ++j) oa[int64_t(i) * kb + j] = la(i, j * 128, 0);
  for (int i = 0; i < nb; ++i)
    for (int j = 0; j < kb; ++j) ob[int64_t(i) * kb + j] = lb(i * 128, j * 128, 0);
}

}  // namespace cutlass_setup
}  // namespace
}  // namespace moekernels
