// The one PYBIND11_MODULE of moekernels._C. Every function takes raw device pointers
// (tensor.data_ptr()) and the CUDA stream handle as integers: no torch headers, so the
// extension builds without a GPU and loads with any torch version.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#ifndef MOEKERNELS_ARCHS
#error "MOEKERNELS_ARCHS (the -gencode list, e.g. \"sm_80 sm_90a compute_120\") is defined by setup.py"
#endif
#ifndef MOEKERNELS_CUTLASS_ERROR
#error "MOEKERNELS_CUTLASS_ERROR (\"\" where csrc/fp8_grouped_cutlass*.cu are built, else why not): setup.py's"
#endif
#ifndef MOEKERNELS_CUTLASS_ARCHS
#error "MOEKERNELS_CUTLASS_ARCHS (the archs of the CUTLASS kernels built, e.g. \"sm_90a sm_100a\"): setup.py's"
#endif

namespace moekernels {
void topk_routing(uintptr_t logits, int dtype, uintptr_t bias, uintptr_t weights, uintptr_t ids,
                  int64_t num_tokens, int num_experts, int64_t stride_t, int top_k, bool softmax,
                  bool renormalize, int n_group, int topk_group, float scale, uintptr_t stream);
void permute(uintptr_t x, int itemsize, uintptr_t dest, uintptr_t out, int64_t num_tokens, int top_k, int64_t hidden,
             int64_t x_stride, uintptr_t stream);
void unpermute(uintptr_t y, int dtype, uintptr_t dest, uintptr_t w, uintptr_t offsets, int num_experts, uintptr_t out,
               int64_t num_tokens, int top_k, int64_t hidden, int64_t y_stride, int64_t out_stride, uintptr_t stream);
void permute_backward(uintptr_t grad, int dtype, uintptr_t dest, uintptr_t out, int64_t num_tokens, int top_k,
                      int64_t hidden, int64_t grad_stride, int64_t out_stride, uintptr_t stream);
void unpermute_backward(uintptr_t grad_y, uintptr_t y, int dtype, uintptr_t dest, uintptr_t w, uintptr_t offsets,
                        int num_experts, uintptr_t grad_sorted, uintptr_t grad_w, int64_t num_tokens, int top_k,
                        int64_t hidden, int64_t gy_stride, int64_t y_stride, int64_t gs_stride, uintptr_t stream);
int plan_chunk();
void plan_routing(uintptr_t ids, int id_itemsize, int64_t num_pairs, int num_experts, int block_size,
                  uintptr_t partial, uintptr_t counts, uintptr_t offsets, uintptr_t source, uintptr_t dest,
                  uintptr_t padded, uintptr_t block_expert, uintptr_t num_padded, int64_t num_blocks,
                  uintptr_t stream);
void quantize_fp8_1x128(uintptr_t x, int dtype, uintptr_t dest, uintptr_t q, uintptr_t scale,
                        int64_t scale_row_stride, int64_t scale_col_stride, int64_t num_rows, int top_k,
                        int64_t hidden, int64_t x_stride, bool pow2, bool vec, uintptr_t stream);
#ifdef MOEKERNELS_WITH_CUTLASS_SM90
int64_t fp8_grouped_cutlass_setup_bytes(int groups);
int64_t fp8_grouped_cutlass_workspace_bytes(int groups, int sm_count);
void fp8_grouped_cutlass_setup(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b,
                               uintptr_t d, uintptr_t sfa, uintptr_t sfb, uintptr_t buf, uintptr_t stream);
void fp8_grouped_mm_cutlass(uintptr_t a, uintptr_t sfa, uintptr_t b, uintptr_t sfb, uintptr_t offs, uintptr_t d,
                            int groups, int64_t m, int64_t n, int64_t k, uintptr_t buf, uintptr_t workspace,
                            int sm_count, uintptr_t stream);
void fp8_grouped_cutlass_scale_offsets(int m, int n, int k, uintptr_t sfa, uintptr_t sfb);
const void* fp8_grouped_cutlass_kernel_address();
#endif
#ifdef MOEKERNELS_WITH_CUTLASS_SM100
int64_t fp8_grouped_cutlass_setup_bytes_sm100(int groups);
int64_t fp8_grouped_cutlass_workspace_bytes_sm100(int groups, int sm_count);
void fp8_grouped_cutlass_setup_sm100(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b,
                                     uintptr_t d, uintptr_t sfa, uintptr_t sfb, uintptr_t buf, uintptr_t stream);
void fp8_grouped_cutlass_setup_host_sm100(uintptr_t offs, int groups, int64_t n, int64_t k, uintptr_t a, uintptr_t b,
                                          uintptr_t d, uintptr_t sfa, uintptr_t sfb, uintptr_t buf);
void fp8_grouped_mm_cutlass_sm100(uintptr_t a, uintptr_t sfa, uintptr_t b, uintptr_t sfb, uintptr_t offs, uintptr_t d,
                                  int groups, int64_t m, int64_t n, int64_t k, uintptr_t buf, uintptr_t workspace,
                                  int sm_count, uintptr_t stream);
void fp8_grouped_cutlass_scale_offsets_sm100(int m, int n, int k, uintptr_t sfa, uintptr_t sfb);
const void* fp8_grouped_cutlass_kernel_address_sm100();
#endif
const void* topk_routing_kernel_address();
const void* permute_kernel_address();
const void* unpermute_kernel_address();
const void* permute_backward_kernel_address();
const void* unpermute_backward_kernel_address();
const void* plan_routing_kernel_address();
const void* quantize_fp8_1x128_kernel_address();
}  // namespace moekernels

namespace {

// Each binding, with one of the kernels it launches (its .cu file's kernels are all built for the same archs).
struct Kernel {
  const char* name;
  const void* (*address)();
};
constexpr Kernel kKernels[] = {
    {"topk_routing", moekernels::topk_routing_kernel_address},
    {"permute", moekernels::permute_kernel_address},
    {"unpermute", moekernels::unpermute_kernel_address},
    {"permute_backward", moekernels::permute_backward_kernel_address},
    {"unpermute_backward", moekernels::unpermute_backward_kernel_address},
    {"plan_routing", moekernels::plan_routing_kernel_address},
    {"quantize_fp8_1x128", moekernels::quantize_fp8_1x128_kernel_address},
#ifdef MOEKERNELS_WITH_CUTLASS_SM90
    {"fp8_grouped_mm_cutlass", moekernels::fp8_grouped_cutlass_kernel_address},  // sm_90a alone
#endif
#ifdef MOEKERNELS_WITH_CUTLASS_SM100
    {"fp8_grouped_mm_cutlass_sm100", moekernels::fp8_grouped_cutlass_kernel_address_sm100},  // sm_100a alone
#endif
};

// (error name, binaryVersion, ptxVersion) of cudaFuncGetAttributes on the current device: "cudaSuccess"
// where the binding's kernel can run there (from its SASS, or PTX the driver compiled), else why not
// (cudaErrorNoKernelImageForDevice: no image for this device's capability). Loads the kernel's module as
// its first launch would; no synchronization.
pybind11::tuple kernel_image(const std::string& name) {
  for (const Kernel& k : kKernels) {
    if (name != k.name) continue;
    cudaFuncAttributes attr{};
    const cudaError_t err = cudaFuncGetAttributes(&attr, k.address());
    if (err != cudaSuccess) cudaGetLastError();  // cleared: the next launch's check_launch would report it
    return pybind11::make_tuple(std::string(cudaGetErrorName(err)), attr.binaryVersion, attr.ptxVersion);
  }
  throw pybind11::value_error("kernel_image: no kernel named '" + name + "' (moekernels._C.KERNELS lists them)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moekernels CUDA kernels (raw pointers + stream handles; see csrc/)";
  m.def("topk_routing", &moekernels::topk_routing,
        "Fused softmax/sigmoid + bias + group-limited top-k routing (csrc/route.cu)");
  m.def("permute", &moekernels::permute, "out[dest[t*k + j]] = x[t], any dtype (csrc/permute.cu)");
  m.def("unpermute", &moekernels::unpermute,
        "out[t] = sum_j w[t, j] * y[dest[t*k + j]] over pairs not dropped (csrc/permute.cu)");
  m.def("permute_backward", &moekernels::permute_backward, "out[t] = sum_j grad[dest[t*k + j]] (csrc/permute.cu)");
  m.def("unpermute_backward", &moekernels::unpermute_backward,
        "grad_sorted[dest] = w * grad_y[t], grad_w = <grad_y[t], y[dest]> (csrc/permute.cu)");
  m.def("plan_routing", &moekernels::plan_routing,
        "Stable counting sort of the pairs by expert, and the block-padded layout (csrc/plan.cu); partial is a "
        "[ceil(N / PLAN_CHUNK) + 1, E + 1] int32 workspace when N > PLAN_CHUNK");
  m.def("quantize_fp8_1x128", &moekernels::quantize_fp8_1x128,
        "(1, 128) fp8 e4m3 quantization, fused with permute when dest is given (csrc/quantize.cu)");
  m.def("kernel_image", &kernel_image, pybind11::arg("name"),
        "(error name, binaryVersion, ptxVersion) of the named binding's kernel on the current CUDA device: "
        "'cudaSuccess' where it can run there (moekernels/_ext.py caches it per device)");
#ifdef MOEKERNELS_WITH_CUTLASS_SM90
  m.def("fp8_grouped_mm_cutlass", &moekernels::fp8_grouped_mm_cutlass,
        "FP8 grouped GEMM, (1, 128) x (128, 128) block scales, bf16 out: CUTLASS's Hopper kernel, its problem "
        "set-up written on the device from offs (csrc/fp8_grouped_cutlass.cu)");
  m.def("fp8_grouped_cutlass_setup", &moekernels::fp8_grouped_cutlass_setup,
        "The set-up kernel alone: each expert's (M, N, K), pointers and strides into buf (moekernels/_cutlass.py)");
  m.def("fp8_grouped_cutlass_setup_bytes", &moekernels::fp8_grouped_cutlass_setup_bytes, "buf's size for E experts");
  m.def("fp8_grouped_cutlass_workspace_bytes", &moekernels::fp8_grouped_cutlass_workspace_bytes,
        "CUTLASS's workspace for E experts on sm_count SMs (its TMA descriptors)");
  m.def("fp8_grouped_cutlass_scale_offsets", &moekernels::fp8_grouped_cutlass_scale_offsets,
        "The built kernel's scale layouts for (m, n, k): offsets into host int64 [m, k/128] and [n/128, k/128]");
#endif
#ifdef MOEKERNELS_WITH_CUTLASS_SM100
  // The same functions for the sm_100a kernel (csrc/fp8_grouped_cutlass_sm100.cu): its set-up buffer also holds
  // each expert's scale layouts, which the host variant writes for the tests.
  m.def("fp8_grouped_mm_cutlass_sm100", &moekernels::fp8_grouped_mm_cutlass_sm100,
        "FP8 grouped GEMM, (1, 128) x (128, 128) block scales, bf16 out: CUTLASS's sm_100a kernel (tcgen05), its "
        "problem set-up written on the device from offs (csrc/fp8_grouped_cutlass_sm100.cu)");
  m.def("fp8_grouped_cutlass_setup_sm100", &moekernels::fp8_grouped_cutlass_setup_sm100,
        "The set-up kernel alone: each expert's (M, N, K), pointers, strides and scale layouts into buf");
  m.def("fp8_grouped_cutlass_setup_host_sm100", &moekernels::fp8_grouped_cutlass_setup_host_sm100,
        "The set-up's bytes written on the host: offs and buf host memory, the rest base addresses");
  m.def("fp8_grouped_cutlass_setup_bytes_sm100", &moekernels::fp8_grouped_cutlass_setup_bytes_sm100,
        "buf's size for E experts");
  m.def("fp8_grouped_cutlass_workspace_bytes_sm100", &moekernels::fp8_grouped_cutlass_workspace_bytes_sm100,
        "CUTLASS's workspace for E experts on sm_count SMs (its TMA descriptors)");
  m.def("fp8_grouped_cutlass_scale_offsets_sm100", &moekernels::fp8_grouped_cutlass_scale_offsets_sm100,
        "The built kernel's scale layouts for (m, n, k): offsets into host int64 [m, k/128] and [n/128, k/128]");
#endif
  // "" where the CUTLASS FP8 grouped GEMMs are built in, else why not (setup.py); the archs of those built.
  m.attr("CUTLASS_ERROR") = MOEKERNELS_CUTLASS_ERROR;
  m.attr("CUTLASS_ARCHS") = MOEKERNELS_CUTLASS_ARCHS;
  m.attr("PLAN_CHUNK") = moekernels::plan_chunk();
  // Names of the ops with a CUDA kernel; tests assert each is exposed.
  pybind11::tuple names(sizeof(kKernels) / sizeof(kKernels[0]));
  for (size_t i = 0; i < names.size(); ++i) names[i] = pybind11::str(kKernels[i].name);
  m.attr("KERNELS") = names;
  // The archs setup.py built every .cu file for (nvcc's code= names; compute_XY is PTX), so that an
  // error can name them without a GPU.
  m.attr("ARCHS") = MOEKERNELS_ARCHS;
}
