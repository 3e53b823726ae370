// FP8 grouped GEMM on datacenter Blackwell (B200/GB200, compute capability 10.0) with CUTLASS's block-scaled
// ptr-array kernel (the kernel of CUTLASS's example 81, 81_blackwell_grouped_gemm_blockwise.cu), for the same
// recipe and the same operands as fp8_grouped_cutlass.cu (Hopper's): out[rows of expert e] = (a * sfa) @
// (b[e] * sfb[e])^T in bf16, a e4m3 [M, K] with float32 [M, K/128] row-major scales, b e4m3 [E, N, K] with
// float32 [E, N/128, K/128] scales, offs int32 cumulative row ends. Built only for sm_100a (setup.py compiles this
// file for that one arch, where CUTLASS's headers are found and the list has 10.0).
//
// Configuration (one instantiation: 40-46 s of nvcc on 2 cores):
// - KernelPtrArrayTmaWarpSpecializedBlockwise2SmSm100: tcgen05 MMA (kind::f8f6f4, e4m3 x e4m3 -> f32; SASS
//   UTCQMMA.2CTA) into TMEM, the 256x128x128 MMA tile across the 2 SMs of a 2x1x1 cluster (each holds 128 rows
//   of A and 64 of B's 128 columns in smem: 24 KB a stage instead of 1-SM's 32 KB, so 8 stages instead of 6,
//   and a quarter less smem read by the MMA for the same 128x128 of work an SM). One warp each for the TMA loads
//   of A and B, the MMA issue, the scale loads (cp.async) and the scheduler; 4 epilogue warps promote each K
//   tile's partial from TMEM (acc += partial * sfa * sfb: 4 LDTM.x32 and 128 FFMA a thread for its row of 128
//   fp32) and store D.
//   Block scaling is this software promotion (a partial in TMEM a K tile, 4 accumulator stages), not tcgen05's
//   block-scaled MMA, which takes ue8m0/ue4m3 scales of 16/32-element vectors (MXFP8/NVFP4), not float32
//   (1, 128)/(128, 128). The 1-SM schedule (128x128x128, cluster 1x1x1) builds too: the same 168 registers
//   and no spills, 6 stages. 2-SM's cost: an expert's M is tiled by 256, so its tail wastes up to 255 rows of
//   MMA (1-SM: 127). tests/test_cutlass.py checks the build's instructions, registers and spills.
// - Scales K-major for both operands (Sm100BlockwiseScaleConfig<1, 128, 128, K, K>), as for Hopper: the layout is
//   an argument an expert here (the set-up kernel writes it), and K-major is our row-major activation scales from
//   the expert's first row and prepare_weight's [N/128, K/128] storage, so neither is copied. MN-major SFA (16-byte
//   cp.async of 4 rows' scales) would need 16-byte aligned [K/128, M_e] runs: our col_major scales are [K/128, M]
//   (stride M, which the layout's int32 stride could take) but an expert's first row is aligned to nothing.
// - The problem set-up is fp8_grouped_cutlass_setup.cuh's (the Hopper one) plus each expert's two scale layouts.
#include "common.cuh"
#include "fp8_grouped_cutlass_setup.cuh"

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

using MmaTileShape = Shape<_256, _128, _128>;  // one MMA across the 2 SMs of a cluster: 128 rows each
using ClusterShape = Shape<_2, _1, _1>;
using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecialized2Sm;
using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedBlockwise2SmSm100;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) a group

using ScaleConfig = cutlass::detail::Sm100BlockwiseScaleConfig<1, 128, 128, UMMA::Major::K, UMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp, MmaTileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
    void, LayoutD*, kAlignD,  // no C: out = acc, and no source read
    ElementD, LayoutD*, kAlignD, EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAccumulator, void, ElementAccumulator>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp,
    ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
    ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB,
    ElementAccumulator, MmaTileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    MainloopSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue, void>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

static_assert(std::is_same_v<typename CollectiveMainloop::InternalLayoutSFA, LayoutSFA> &&
              std::is_same_v<typename CollectiveMainloop::InternalLayoutSFB, LayoutSFB>,
              "the set-up writes the collective's own scale layout types");

// The set-up buffer (fp8_grouped_cutlass_setup.cuh): the Hopper kernel's, then each expert's SFA and SFB layouts.
using Run = cutlass_setup::Grouped<Gemm, ScaleConfig>;
constexpr const char* kName = "fp8_grouped_mm_cutlass (sm_100a)";

}  // namespace

int64_t fp8_grouped_cutlass_setup_bytes_sm100(int groups) { return Run::S::bytes(groups); }

int64_t fp8_grouped_cutlass_workspace_bytes_sm100(int groups, int sm_count) {
  return Run::workspace_bytes(kName, groups, sm_count);
}

void fp8_grouped_cutlass_setup_sm100(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b,
                                     uintptr_t d, uintptr_t sfa, uintptr_t sfb, uintptr_t buf, uintptr_t stream) {
  Run::S::launch(offs, groups, n, k, a, b, d, sfa, sfb, buf, stream);
}

// The set-up's bytes written on the host (offs and buf host memory): tests/test_cutlass.py checks the twin
// against them, scale layouts included, without a GPU.
void fp8_grouped_cutlass_setup_host_sm100(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b,
                                          uintptr_t d, uintptr_t sfa, uintptr_t sfb, uintptr_t buf) {
  Run::S::on_host(offs, groups, n, k, a, b, d, sfa, sfb, buf);
}

void fp8_grouped_mm_cutlass_sm100(uintptr_t a, uintptr_t sfa, uintptr_t b, uintptr_t sfb, uintptr_t offs, uintptr_t d,
                                  int groups, int64_t m, int64_t n, int64_t k, uintptr_t buf, uintptr_t workspace,
                                  int sm_count, uintptr_t stream) {
  Run::run(kName, a, sfa, b, sfb, offs, d, groups, m, n, k, buf, workspace, sm_count, stream);
}

// The built ScaleConfig's offsets (fp8_grouped_cutlass_setup.cuh's scale_offsets), for the tests.
void fp8_grouped_cutlass_scale_offsets_sm100(int m, int n, int k, uintptr_t sfa, uintptr_t sfb) {
  cutlass_setup::scale_offsets<ScaleConfig>(m, n, k, sfa, sfb);
}

const void* fp8_grouped_cutlass_kernel_address_sm100() {
  return reinterpret_cast<const void*>(&cutlass::device_kernel<GemmKernel>);
}

}  // namespace moekernels
