"""FP8 (e4m3) inference on DeepSeek-V3's block recipe: weights quantized in (128, 128) blocks, activations in
(1, 128) groups on the fly.

1. A linear layer: ``fp8_mm`` on the quantized token rows and weight.
2. An MoE layer's experts: ``fused_moe`` with fp8 weights and their block scales.
Each is compared with the bf16 layer computed in float32 (the reference), next to the bf16 layer's own rounding.
e4m3 keeps 3 mantissa bits to bf16's 7, so its relative error is about 15 times bf16's; the checks are the
library's documented bounds: DeepGEMM's ``calc_diff`` within 1e-3 for the GEMM and 3e-3 for the layer (two GEMMs
and a quantized intermediate), and the GEMM within 1e-2 of the product of its dequantized operands.

Runs as it is on a CPU (the pure-PyTorch reference of every op) and on a CUDA GPU (the e4m3 tensor-core kernels).
"""

import torch

import moekernels
from moekernels.fp8 import dequantize_fp8

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def calc_diff(a, b):
    """DeepGEMM's measure: 1 - 2<a, b> / (|a|^2 + |b|^2), about rel_err**2 / 2."""
    a, b = a.double(), b.double()
    return (1 - 2 * (a * b).sum() / (a * a + b * b).sum()).item()


# 1. One linear layer, y = x @ w.T: K and N multiples of 128 (the weight's blocks), any M.
M, K, N = 40, 512, 256
x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
w = (torch.randn(N, K, device=device) / K**0.5).to(torch.bfloat16)  # nn.Linear's [out, in] layout
qx, sx = moekernels.quantize_fp8(x, (1, 128))  # [M, K] e4m3, [M, K / 128] float32
qw, sw = moekernels.quantize_fp8(w, (128, 128))  # [N, K] e4m3, [N / 128, K / 128] float32
# The GEMM takes b = [K, N]: the weight's transposed view, and the transposed block scales with it.
y = moekernels.fp8_mm(qx, sx, qw.t(), sw.t(), out_dtype=torch.bfloat16)
ref = x.float() @ w.float().t()
bf16 = x @ w.t()
dequantized = dequantize_fp8(qx, sx) @ dequantize_fp8(qw, sw).t()  # what the kernel computes, in float32
print(f"fp8_mm    [{M}x{K}] @ [{K}x{N}]: vs bf16 rel err {rel_err(y, ref):.2e}, calc_diff {calc_diff(y, ref):.1e} "
      f"(bf16's own rounding {rel_err(bf16, ref):.2e}); vs its dequantized operands {rel_err(y, dequantized):.1e}")
assert calc_diff(y, ref) < 1e-3 and rel_err(y, dequantized) < 1e-2

# 2. The experts of an MoE layer: H and I multiples of 128.
T, H, I, E, k = 32, 256, 128, 8, 2
x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
w_gate_up = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(torch.bfloat16)  # gate rows, then up rows
w_down = (torch.randn(E, H, I, device=device) / I**0.5).to(torch.bfloat16)
logits = torch.randn(T, E, device=device)
topk_weights, topk_ids = moekernels.topk_routing(logits, k, renormalize=True)

q_gate_up, s_gate_up = moekernels.quantize_fp8(w_gate_up, (128, 128))  # once, at load time
q_down, s_down = moekernels.quantize_fp8(w_down, (128, 128))
y = moekernels.fused_moe(x, q_gate_up, q_down, topk_weights, topk_ids, w_gate_up_scale=s_gate_up,
                         w_down_scale=s_down)
ref = moekernels.fused_moe(x.float(), w_gate_up.float(), w_down.float(), topk_weights, topk_ids)
bf16 = moekernels.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)
print(f"fused_moe T={T} H={H} I={I} E={E} k={k}: vs bf16 rel err {rel_err(y, ref):.2e}, "
      f"calc_diff {calc_diff(y, ref):.1e} (bf16's own rounding {rel_err(bf16, ref):.2e})")
fp8_bytes = q_gate_up.numel() + q_down.numel() + 4 * (s_gate_up.numel() + s_down.numel())
print(f"check: fp8 experts calc_diff {calc_diff(y, ref):.1e} <= 3e-3; weights {fp8_bytes} bytes with their scales, "
      f"bf16 {2 * (w_gate_up.numel() + w_down.numel())}")
assert calc_diff(y, ref) < 3e-3
