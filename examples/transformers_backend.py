"""moekernels as a transformers experts backend: a tiny Qwen3-MoE built from a config, saved, and loaded twice, with
``experts_implementation="eager"`` (transformers' own loop over experts) and ``"moekernels"`` (``fused_moe``). The
check: same logits and same gradients, to rounding. The router stays the model's own; only the experts change.

Runs as it is on a CPU and on a CUDA GPU. Any model whose experts use ``@use_experts_implementation`` works the
same way (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, gpt-oss, ...).
"""

import os
import tempfile

# torch.profiler, which lists the ops that ran below, runs on Kineto, and Kineto logs "USDT: ... profiler_start" and
# "profiler_stop" lines on stderr at each profile. Its log level above all of its levels, set before torch starts it,
# keeps it quiet (an exported KINETO_LOG_LEVEL wins).
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch
import transformers

import moekernels

transformers.utils.logging.disable_progress_bar()
device = "cuda" if torch.cuda.is_available() else "cpu"
# float32 on both. On the GPU the moekernels experts run float32 GEMMs as tf32 (about 1e-3 relative error each),
# eager runs them in full float32; on the CPU both are float32 and differ only in the order of the sums.
TOL = 1e-2 if device == "cuda" else 1e-5

# transformers was imported first, so `import moekernels` has already registered the backend; with the other order
# (or to be explicit) this one-liner does, and returns the name to pass.
name = moekernels.register_transformers()  # "moekernels"

torch.manual_seed(0)
config = transformers.Qwen3MoeConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, initializer_range=0.1)


def run(model, input_ids):
    """Logits, and the gradient of a loss on them with respect to every parameter."""
    logits = model(input_ids=input_ids).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


input_ids = torch.randint(0, config.vocab_size, (2, 12), device=device)
with tempfile.TemporaryDirectory() as path:
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    models = {impl: transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation=impl).to(device)
              for impl in ("eager", name)}

ref_logits, ref_grads = run(models["eager"], input_ids)
with torch.profiler.profile() as prof:  # to see which ops ran
    logits, grads = run(models[name], input_ids)
ran = {event.key for event in prof.key_averages()}
assert "moekernels::fused_moe" in ran, "the moekernels experts did not run"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


print(f"{type(models[name]).__name__} ({type(models[name].model.layers[0].mlp.experts).__name__}), "
      f"experts_implementation={models[name].config._experts_implementation!r}: ran "
      f"{sorted(op for op in ran if op.startswith('moekernels::'))}")
logit_err = rel_err(logits, ref_logits)
grad_err = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
print(f"check: moekernels vs eager: logits rel err {logit_err:.1e}, worst parameter gradient rel err {grad_err:.1e}")
assert logit_err < TOL and grad_err < TOL, (logit_err, grad_err)
