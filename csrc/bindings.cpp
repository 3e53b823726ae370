// The one PYBIND11_MODULE of moekernels._C. Every function takes raw device pointers
// (tensor.data_ptr()) and the CUDA stream handle as integers: no torch headers, so the
// extension builds without a GPU and loads with any torch version.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace moekernels {
void topk_routing(uintptr_t logits, int dtype, uintptr_t bias, uintptr_t weights, uintptr_t ids,
                  int64_t num_tokens, int num_experts, int64_t stride_t, int top_k, bool softmax,
                  bool renormalize, int n_group, int topk_group, float scale, uintptr_t stream);
}  // namespace moekernels

PYBIND11_MODULE(_C, m) {
  m.doc() = "moekernels CUDA kernels (raw pointers + stream handles; see csrc/)";
  m.def("topk_routing", &moekernels::topk_routing,
        "Fused softmax/sigmoid + bias + group-limited top-k routing (csrc/route.cu)");
  // Names of the ops with a CUDA kernel; tests assert each is exposed.
  m.attr("KERNELS") = pybind11::make_tuple("topk_routing");
}
