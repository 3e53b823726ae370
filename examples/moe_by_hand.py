"""An MoE layer's experts by hand, stage by stage, then the same in one call.

    route -> plan -> permute -> grouped GEMM (gate/up) + SwiGLU -> grouped GEMM (down) -> combine

The checks: the stages agree with ``moekernels.fused_moe`` (which fuses them) and with a plain PyTorch loop over the
experts. Runs as it is on a CPU (the pure-PyTorch reference of every op) and on a CUDA GPU (the kernels).
``TRITON_INTERPRET=1 MOEKERNELS_BACKEND=triton python examples/moe_by_hand.py`` runs the Triton kernels on the CPU,
in Triton's interpreter.
"""

import torch

import moekernels

device = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 on the GPU, as a model runs; float32 on the CPU (torch's bf16 matmuls there are slow and round differently).
dtype = torch.bfloat16 if device == "cuda" else torch.float32
T, H, I, E, K = 50, 64, 32, 8, 2  # tokens, hidden size, expert intermediate size, experts, experts per token

torch.manual_seed(0)
x = torch.randn(T, H, device=device, dtype=dtype)
router = torch.randn(H, E, device=device) / H**0.5
w_gate_up = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype)  # per expert: gate rows, then up rows
w_down = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype)

# 1. Route: each token's K experts and their weights (softmax, top-K, renormalized: Mixtral's and Qwen3's router).
logits = x.float() @ router  # [T, E]
topk_weights, topk_ids = moekernels.topk_routing(logits, K, renormalize=True)  # float32 [T, K], int32 [T, K]

# 2. Plan: the T*K (token, slot) pairs sorted by expert. expert_offsets are the cumulative segment ends.
plan = moekernels.plan_routing(topk_ids, E)
print(f"tokens per expert {plan.expert_counts.tolist()}, offsets {plan.expert_offsets.tolist()}")

# 3. Permute: row r of x_sorted is x[plan.source_index[r] // K]; expert e's rows are one contiguous segment.
x_sorted = moekernels.permute(x, plan)  # [T*K, H]

# 4. Grouped GEMMs. grouped_mm takes w [E, in, out]: the [E, out, in] weights are passed as transposed views.
gate_up = moekernels.grouped_mm(x_sorted, w_gate_up.transpose(1, 2), plan.expert_offsets)  # [T*K, 2I]
gate, up = gate_up.chunk(2, dim=-1)
h = torch.nn.functional.silu(gate) * up  # SwiGLU, [T*K, I]
y_sorted = moekernels.grouped_mm(h, w_down.transpose(1, 2), plan.expert_offsets)  # [T*K, H]

# 5. Combine: y[t] = sum_j topk_weights[t, j] * (the row of pair (t, j)).
y = moekernels.unpermute(y_sorted, plan, topk_weights)  # [T, H]

# The same layer in one call: the gather, SwiGLU and the weighting fused into the two GEMMs.
fused = moekernels.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)

# A plain loop over experts in float32.
loop = torch.zeros(T, H, device=device)
for e in range(E):
    token, slot = (topk_ids == e).nonzero(as_tuple=True)
    g, u = (x[token].float() @ w_gate_up[e].float().t()).chunk(2, dim=-1)
    out = (torch.nn.functional.silu(g) * u) @ w_down[e].float().t()
    loop.index_add_(0, token, topk_weights[token, slot, None] * out)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# float32: the order of the sums only. bf16: each stage rounds its output to bf16 (the fused path skips two of them).
tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
print(f"check: by hand vs fused_moe: max abs err {(y.float() - fused.float()).abs().max().item():.1e}, "
      f"rel err {rel_err(y, fused):.1e}; by hand vs a torch loop: max abs err "
      f"{(y.float() - loop).abs().max().item():.1e}, rel err {rel_err(y, loop):.1e} ({dtype})")
assert int(plan.expert_counts.sum()) == T * K
assert rel_err(y, fused) < tol and rel_err(y, loop) < tol and rel_err(fused, loop) < tol
