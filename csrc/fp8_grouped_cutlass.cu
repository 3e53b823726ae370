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
//   (tests/test_cutlass.py) checks this build's registers, spills and instructions.
// - Scales K-major for both operands (Sm90BlockwiseScaleConfig<1, 128, 128, K, K>). The grouped kernel
//   derives each group's scale layout from its problem shape (tile_atom_to_shape_SFA/SFB in the collective),
//   not from the layout_SFA argument: K-major it is [M_g, K/128] with row stride K/128, which is our
//   row-major activation scales from row offs[g-1] on, and [N/128, K/128] for the weights, which is
//   prepare_weight's; so neither is copied. MN-major would need [K/128, M_g] packed for each expert, which
//   quantize_fp8's col_major ([K/128, M] with stride M) is not: a copy. The cost: the producer warp reads
//   the 128 A scales of a K step with 128 4-byte cp.async 4 * K/128 bytes apart (224 B at K 7168) instead
//   of one 512-byte run; off the tensor cores' path, and 1/128 of A's bytes.
// - The problem set-up (each expert's shape, pointers and strides) is written on the device from offs by
//   fp8_grouped_cutlass_setup.cuh's kernel (shared with the sm_100a file): no host sync, so CUDA-graph safe. An
//   expert with no rows gets M = 0 (no tiles); a tail of M % 128 rows is bounded by TMA with the expert's own M
//   (zeros read, nothing stored past it), so no padding. The GEMM's grid is the SM count (persistent),
//   independent of the row counts.
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

// The set-up buffer (fp8_grouped_cutlass_setup.cuh): shapes, then the 8-byte arrays; no scale layouts (the
// grouped Sm90 collective derives them from each expert's shape).
using Run = cutlass_setup::Grouped<Gemm, void>;
constexpr const char* kName = "fp8_grouped_mm_cutlass";

}  // namespace

int64_t fp8_grouped_cutlass_setup_bytes(int groups) { return Run::S::bytes(groups); }

int64_t fp8_grouped_cutlass_workspace_bytes(int groups, int sm_count) {
  return Run::workspace_bytes(kName, groups, sm_count);
}

void fp8_grouped_cutlass_setup(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b,
                               uintptr_t d, uintptr_t sfa, uintptr_t sfb, uintptr_t buf, uintptr_t stream) {
  Run::S::launch(offs, groups, n, k, a, b, d, sfa, sfb, buf, stream);
}

void fp8_grouped_mm_cutlass(uintptr_t a, uintptr_t sfa, uintptr_t b, uintptr_t sfb, uintptr_t offs, uintptr_t d,
                            int groups, int64_t m, int64_t n, int64_t k, uintptr_t buf, uintptr_t workspace,
                            int sm_count, uintptr_t stream) {
  Run::run(kName, a, sfa, b, sfb, offs, d, groups, m, n, k, buf, workspace, sm_count, stream);
}

// Where the built kernel reads each scale block, in elements from the expert's scale pointer: its ScaleConfig's
// layouts for an (m, n, k) problem (host code; the same tile_atom_to_shape_SFA/SFB the collective calls).
// sfa: [m, k/128] int64, sfb: [n/128, k/128] int64, host memory. tests/test_cutlass.py checks the emulation
// (moekernels/_cutlass.py) and our tensors' strides against it, without a GPU.
void fp8_grouped_cutlass_scale_offsets(int m, int n, int k, uintptr_t sfa, uintptr_t sfb) {
  cutlass_setup::scale_offsets<ScaleConfig>(m, n, k, sfa, sfb);
}

const void* fp8_grouped_cutlass_kernel_address() {
  return reinterpret_cast<const void*>(&cutlass::device_kernel<GemmKernel>);
}

}  // namespace moekernels
