"""LoRA fine-tuning on frozen fp8 (e4m3) experts: moekernels.MoE(lora_rank=...) and quantize_experts().

A "pretrained" model (two MoE layers with residuals) has its experts frozen in e4m3 with (128, 128) block scales,
the DeepSeek-V3 checkpoint format, and gets rank-8 LoRA adapters on both expert projections. The task: imitate a
teacher that is the same model plus a random low-rank change of its experts, which the adapters alone can learn.
Only the adapters train (AdamW); the e4m3 experts, the routers and the head stay as they are.

The checks: at the start (B = 0) the model is exactly the base model; the experts get no gradient and stay
e4m3 buffers; the loss falls below a tenth of where it started; and the trained layer equals the per-expert loop
of moekernels.reference on the dequantized weights with the adapters added (the check forms W + sBA's effect
expert by expert; the layer never does).

Runs as it is on a CPU (float32 adapters, ~10 s) and on a CUDA GPU (bf16).
"""

import copy
import time

import torch

import moekernels
from moekernels import reference

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
T, H, I, E, K, R = 64, 128, 128, 8, 2, 8  # tokens, hidden, expert intermediate (multiples of 128), experts, k, rank
STEPS = 15
torch.manual_seed(0)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            moekernels.MoE(H, I, E, K, lora_rank=R, lora_alpha=2 * R, dtype=dtype, device=device) for _ in range(2))
        self.head = torch.nn.Linear(H, 64, dtype=dtype, device=device)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


model = Model()  # the "pretrained" model: its experts stand for a checkpoint's
base = copy.deepcopy(model)  # the base model without adapters, for the first check
for layer in model.layers:
    layer.quantize_experts()  # w_gate_up, w_down -> e4m3 buffers + float32 (128, 128) scales, in place
for layer in base.layers:
    layer.quantize_experts()
for p in model.parameters():  # freeze everything but the adapters (the routers could train too: they are parameters)
    p.requires_grad_(any(p is getattr(layer, n) for layer in model.layers
                         for n in ("lora_a1", "lora_b1", "lora_a2", "lora_b2")))
adapters = [p for p in model.parameters() if p.requires_grad]
print(f"trainable: {sum(p.numel() for p in adapters):,} adapter parameters; frozen e4m3 experts: "
      f"{sum(layer.w_gate_up.numel() + layer.w_down.numel() for layer in model.layers):,} weights")

teacher = copy.deepcopy(model)
with torch.no_grad():
    for layer in teacher.layers:  # a random low-rank change of the teacher's experts
        layer.lora_b1.normal_(0, 0.1)
        layer.lora_b2.normal_(0, 0.1)

x = torch.randn(T, H, device=device, dtype=dtype)
with torch.no_grad():
    target = teacher(x)
    start = model(x)
    # B = 0: the adapted model starts as the base one (fused_moe adds s (x A^T) B^T = 0).
    diff = ((start - base(x)).norm() / start.norm()).item()
print(f"at the start, adapted vs base model: relative difference {diff:.1e}")
assert diff < 1e-6, diff

opt = torch.optim.AdamW(adapters, lr=1e-2, weight_decay=0.0)
t0 = time.perf_counter()
for step in range(STEPS):
    loss = (model(x) - target).float().square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step == 0:
        first = loss.item()
        # The experts are frozen buffers: no gradient anywhere but the adapters.
        assert all(layer.w_gate_up.dtype == torch.float8_e4m3fn and layer.w_gate_up.grad is None
                   for layer in model.layers)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    if step % 10 == 0 or step == STEPS - 1:
        print(f"step {step:2d}  loss {loss.item():.5f}")
print(f"{STEPS} steps in {time.perf_counter() - t0:.1f} s")

# The trained layer against the per-expert loop on the dequantized e4m3 weights with the adapters added, in float64.
layer = model.layers[0]
with torch.no_grad():
    _, weights, ids = layer.route(x)
    y = layer(x)
    want = reference.fused_moe(x.double(), layer.w_gate_up, layer.w_down, weights, ids,
                               w_gate_up_scale=layer.w_gate_up_scale, w_down_scale=layer.w_down_scale,
                               lora=moekernels.ExpertsLoRA(*(t.double() for t in layer.lora().tensors()),
                                                           scale=layer.lora_scale))
# The layer quantizes its activations (1, 128) for the e4m3 GEMMs; the loop does not: DeepGEMM's calc_diff bound
# for the fp8 layer, 3e-3.
a, b = y.double(), want
calc_diff = (1 - 2 * (a * b).sum() / (a * a + b * b).sum()).item()
print(f"check: loss {first:.4f} -> {loss.item():.5f} ({loss.item() / first:.1%}); trained layer vs the per-expert "
      f"loop: calc_diff {calc_diff:.1e}")
assert loss.item() < 0.1 * first, (first, loss.item())
assert calc_diff < 3e-3, calc_diff
