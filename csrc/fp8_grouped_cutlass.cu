// FP8 grouped GEMM on Hopper with CUTLASS's block-scaled ptr-array kernel (the kernel of CUTLASS's
// example 68), for DeepSeek-V3's recipe: out[rows of expert e] = (a * sfa) @ (b[e] * sfb[e])^T in bf16.
//   a    e4m3 [M, K] row-major, the experts' rows contiguous (offs: int32 cumulative ends, [E]);
//   sfa  float32 [M, K/128] row-major: quantize_fp8(x, (1, 128))'s scales;
//   b    e4m3 [E, N, K] (K contiguous: CUTLASS's column-major B);
//   sfb  float32 [E, N/128, K/128] row-major: prepare_weight's (128, 128) block scales;
//   out  bf16 [M, N] row-major.
// Built only for sm_90a (setup.py compiles this file for that one arch, and only where CUTLASS's
// headers are found: the nvidia-cutlass wheel, or CUTLASS_PATH).
//
// Configuration (one instantiation: it takes ~1 min of nvcc on 2 cores):
// - KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise, 128x128x128 tile, 1x2x1 cluster (A
//   multicast to the 2 CTAs of a cluster, which share its rows). Cooperative: the 2 consumer warpgroups
//   split the 128 rows, 64x128 fp32 a warpgroup = 64 accumulator registers a thread plus 64 of the
//   block-scale promotion's temporaries. Ping-pong gives each warpgroup the whole 128x128 tile (128 + 128
//   registers against setmaxnreg's 240): the issue's trial of it spilled 704 bytes. The contract
//   (tests/test_cutlass_contract.py) checks this build's registers, spills and instructions.
// - Scales K-major for both operands (Sm90BlockwiseScaleConfig<1, 128, 128, K, K>). The grouped kernel
//   derives each group's scale layout from its problem shape (tile_atom_to_shape_SFA/SFB in the collective),
//   not from the layout_SFA argument: K-major it is [M_g, K/128] with row stride K/128, which is our
//   row-major activation scales from row offs[g-1] on, and [N/128, K/128] for the weights, which is
//   prepare_weight's; so neither is copied. MN-major would need [K/128, M_g] packed for each expert, which
//   quantize_fp8's col_major ([K/128, M] with stride M) is not: a copy. The cost: the producer warp reads
//   the 128 A scales of a K step with 128 4-byte cp.async 4 * K/128 bytes apart (224 B at K 7168) instead
//   of one 512-byte run; off the tensor cores' path, and 1/128 of A's bytes.
// - The problem set-up (each expert's shape, pointers and strides) is written on the device from offs
//   by setup_kernel: no host sync, so CUDA-graph safe. An expert with no rows gets M = 0 (no tiles); a tail
//   of M % 128 rows is bounded by TMA with the expert's own M (zeros read, nothing stored past it), so no
//   padding. The GEMM's grid is the SM count (persistent), independent of the row counts.
#include "common.cuh"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"

namespace moekernels {
namespace {

using namespace cute;

using ElementA = cutlass::float_e4m3_t;
using ElementB = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using ElementAccumulator = float;  // also the scales' type (the collective requires it)
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;  // [N, K] with K contiguous
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignAB = 16;  // elements: TMA's 16 bytes
constexpr int kAlignD = 8;

using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _2, _1>;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) a group

using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
    void, LayoutD*, kAlignD,  // no C: out = acc, and no source read
    ElementD, LayoutD*, kAlignD, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAccumulator, void, ElementAccumulator>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
    ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB,
    ElementAccumulator, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

using StrideA = typename GemmKernel::InternalStrideA;
using StrideB = typename GemmKernel::InternalStrideB;
using StrideD = typename GemmKernel::InternalStrideD;
using Shape3 = typename ProblemShape::UnderlyingProblemShape;

// The set-up arrays, E entries each, one after the other in this order in one buffer (the Python twin,
// moekernels/_cutlass.py, lays out and fills the same): shapes (M, N, K) int32, then 8-byte entries:
// pointers to A, B, D, SFA, SFB, and the one runtime stride of A, B and D (the others are static 1 and 0).
static_assert(sizeof(Shape3) == 12, "GroupProblemShape's (M, N, K): 3 int32");
static_assert(sizeof(StrideA) == 8 && sizeof(StrideB) == 8 && sizeof(StrideD) == 8,
              "the strides hold one int64 (row/column stride), the rest static");
constexpr int kSetupArrays = 8;  // the 8-byte arrays after the shapes

__host__ __device__ inline int64_t shapes_bytes(int groups) { return (int64_t(groups) * 12 + 15) / 16 * 16; }

__global__ void setup_kernel(const int32_t* __restrict__ offs, int groups, int n, int k, const uint8_t* a,
                             const uint8_t* b, __nv_bfloat16* d, const float* sfa, const float* sfb, uint8_t* buf) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const int64_t start = g == 0 ? 0 : offs[g - 1];
  // Clamped: a decreasing offs (a caller's error, not checked: that would be a host sync) makes an empty
  // expert rather than a negative M. moekernels/_cutlass.py's setup_twin does the same.
  const int64_t rows = max(int64_t(offs[g]) - start, int64_t(0));
  auto* shapes = reinterpret_cast<Shape3*>(buf);
  shapes[g] = Shape3(static_cast<int>(rows), n, k);
  auto* arr = reinterpret_cast<uint64_t*>(buf + shapes_bytes(groups));
  const int64_t kb = k / 128, nb = n / 128;
  arr[0 * groups + g] = reinterpret_cast<uint64_t>(a + start * k);
  arr[1 * groups + g] = reinterpret_cast<uint64_t>(b + int64_t(g) * n * k);
  arr[2 * groups + g] = reinterpret_cast<uint64_t>(d + start * n);
  arr[3 * groups + g] = reinterpret_cast<uint64_t>(sfa + start * kb);
  arr[4 * groups + g] = reinterpret_cast<uint64_t>(sfb + int64_t(g) * nb * kb);
  reinterpret_cast<StrideA*>(arr + 5 * groups)[g] = cutlass::make_cute_packed_stride(StrideA{}, {int(rows), k, 1});
  reinterpret_cast<StrideB*>(arr + 6 * groups)[g] = cutlass::make_cute_packed_stride(StrideB{}, {n, k, 1});
  reinterpret_cast<StrideD*>(arr + 7 * groups)[g] = cutlass::make_cute_packed_stride(StrideD{}, {int(rows), n, 1});
}

// Rows at or after offs[-1] belong to no expert and are zero (fp8_grouped_mm's contract): written here rather
// than the whole output zeroed first (a memset of M x N x 2 bytes, 6% of the GEMM at M 32768, N 4096, K 7168
// and 1,300 TFLOP/s). A fixed grid strides over the tail, 16 bytes a store (N % 128 == 0 keeps rows 16-byte
// aligned); with no tail each thread reads offs[-1] and exits.
__global__ void zero_tail_kernel(const int32_t* __restrict__ offs, int groups, int64_t m, int64_t n, uint4* d) {
  const int64_t start = min(max(int64_t(offs[groups - 1]), int64_t(0)), m) * n / 8;  // 8 bf16 a uint4
  const int64_t end = m * n / 8;
  for (int64_t i = start + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < end; i += int64_t(gridDim.x) * blockDim.x)
    d[i] = make_uint4(0, 0, 0, 0);
}

typename Gemm::Arguments make_args(int groups, uint8_t* buf, int sm_count) {
  auto* arr = reinterpret_cast<uint64_t*>(buf + shapes_bytes(groups));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, reinterpret_cast<Shape3*>(buf), nullptr},  // no host shapes: the device's alone
      {reinterpret_cast<const ElementA**>(arr + 0 * groups), reinterpret_cast<StrideA*>(arr + 5 * groups),
       reinterpret_cast<const ElementB**>(arr + 1 * groups), reinterpret_cast<StrideB*>(arr + 6 * groups),
       reinterpret_cast<const float**>(arr + 3 * groups), nullptr,  // layouts unused: see the header
       reinterpret_cast<const float**>(arr + 4 * groups), nullptr},
      {{}, nullptr, nullptr, reinterpret_cast<ElementD**>(arr + 2 * groups),
       reinterpret_cast<StrideD*>(arr + 7 * groups)},
      cutlass::KernelHardwareInfo{0, sm_count}};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  return args;
}

}  // namespace

int64_t fp8_grouped_cutlass_setup_bytes(int groups) { return shapes_bytes(groups) + int64_t(kSetupArrays) * 8 * groups; }

// Also CUTLASS's own check of the arguments (host code, run by the op before each launch, and by the tests
// without a GPU): the grouped mode, the cluster and the scheduler. The row counts live on the device, so no
// host check sees them: TMA bounds them.
int64_t fp8_grouped_cutlass_workspace_bytes(int groups, int sm_count) {
  uint8_t* fake = nullptr;  // neither reads a pointer
  const auto args = make_args(groups, fake, sm_count);
  const cutlass::Status status = Gemm::can_implement(args);
  if (status != cutlass::Status::kSuccess) {
    throw std::invalid_argument(std::string("fp8_grouped_mm_cutlass: CUTLASS cannot implement it: ") +
                                cutlassGetStatusString(status));
  }
  return static_cast<int64_t>(Gemm::get_workspace_size(args));
}

void fp8_grouped_cutlass_setup(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b,
                               uintptr_t d, uintptr_t sfa, uintptr_t sfb, uintptr_t buf, uintptr_t stream) {
  if (groups <= 0) return;
  constexpr int kThreads = 128;
  setup_kernel<<<(groups + kThreads - 1) / kThreads, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const int32_t*>(offs), groups, static_cast<int>(n), static_cast<int>(k),
      reinterpret_cast<const uint8_t*>(a), reinterpret_cast<const uint8_t*>(b),
      reinterpret_cast<__nv_bfloat16*>(d), reinterpret_cast<const float*>(sfa), reinterpret_cast<const float*>(sfb),
      reinterpret_cast<uint8_t*>(buf));
  check_launch("fp8_grouped_cutlass setup");
}

// d: bf16 [m, n]; buf: fp8_grouped_cutlass_setup_bytes(groups) bytes, 16-aligned; workspace: ..._workspace_bytes.
void fp8_grouped_mm_cutlass(uintptr_t a, uintptr_t sfa, uintptr_t b, uintptr_t sfb, uintptr_t offs, uintptr_t d,
                            int groups, int64_t m, int64_t n, int64_t k, uintptr_t buf, uintptr_t workspace,
                            int sm_count, uintptr_t stream) {
  if (groups <= 0 || m <= 0) return;
  fp8_grouped_cutlass_setup(offs, groups, n, k, a, b, d, sfa, sfb, buf, stream);
  zero_tail_kernel<<<sm_count * 2, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const int32_t*>(offs), groups, m, n, reinterpret_cast<uint4*>(d));
  check_launch("fp8_grouped_mm_cutlass zero tail");
  Gemm gemm;
  auto args = make_args(groups, reinterpret_cast<uint8_t*>(buf), sm_count);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  cutlass::Status status = gemm.initialize(args, reinterpret_cast<void*>(workspace), s);
  if (status != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("fp8_grouped_mm_cutlass: initialize: ") + cutlassGetStatusString(status));
  }
  status = gemm.run(s);
  if (status != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("fp8_grouped_mm_cutlass: run: ") + cutlassGetStatusString(status));
  }
  check_launch("fp8_grouped_mm_cutlass");
}

// Where the built kernel reads each scale block, in elements from the expert's scale pointer: its ScaleConfig's
// layouts for an (m, n, k) problem (host code; the same tile_atom_to_shape_SFA/SFB the collective calls).
// sfa: [m, k/128] int64, sfb: [n/128, k/128] int64, host memory. tests/test_cutlass.py checks the emulation
// (moekernels/_cutlass.py) and our tensors' strides against it, without a GPU.
void fp8_grouped_cutlass_scale_offsets(int m, int n, int k, uintptr_t sfa, uintptr_t sfb) {
  const auto la = ScaleConfig::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
  const auto lb = ScaleConfig::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));
  auto* oa = reinterpret_cast<int64_t*>(sfa);
  auto* ob = reinterpret_cast<int64_t*>(sfb);
  const int kb = (k + 127) / 128, nb = (n + 127) / 128;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < kb; ++j) oa[int64_t(i) * kb + j] = la(i, j * 128, 0);
  for (int i = 0; i < nb; ++i)
    for (int j = 0; j < kb; ++j) ob[int64_t(i) * kb + j] = lb(i * 128, j * 128, 0);
}

const void* fp8_grouped_cutlass_kernel_address() {
  return reinterpret_cast<const void*>(&cutlass::device_kernel<GemmKernel>);
}

}  // namespace moekernels
