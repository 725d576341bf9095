"""lm_head + GSPO loss forward + backward: the fused kernels, the full-logits reference, and peers.

Implementations: "reference" (logits -> log_softmax -> gather -> GSPO loss, as TRL computes it),
"fused" (gspo_kernels.fused_linear_gspo_loss with its defaults: on a CPU each sequence's logits
kept, 6NHV; on a GPU every logit recomputed in cuBLAS tiles with Triton epilogues, 8NHV),
"fused_recompute" (budget 0: every logit recomputed, 8NHV), "fused_torch" (budget 0 with the
PyTorch epilogues, forced with use_backend("torch"): what "fused" ran on a GPU before the Triton
epilogues), "liger" (Liger-Kernel's chunked LigerFusedLinearGRPOLoss, sequence-level importance
sampling, loss_type="grpo", beta=0, uncompiled), "liger-triton" (logits materialized, then
Liger-Kernel's Triton `triton_grpo_loss` with the same options; CUDA only; it scores T-1 tokens
per row, since it drops the last position of the logits). Peers are skipped when not installed.

FLOPs counted for every implementation: 6 N H V (the logits' forward and the two gradient
GEMMs), N = B x T tokens, whatever an implementation recomputes on top.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

import gspo_kernels as gk
from gspo_engine.benchmarks.cases import Case
from gspo_kernels import reference

IMPLEMENTATIONS = ("reference", "fused", "fused_recompute", "fused_torch", "liger", "liger-triton")
EPS_LOW, EPS_HIGH = 3e-4, 4e-4
# (B, T, H, V): on a GPU the target shape, N = 16,384 tokens, H = 4096, V = 151,936 (Qwen3's vocabulary).
SHAPES = {"gpu": [(4, 4096, 4096, 151936)], "cpu": [(2, 256, 256, 32768)], "smoke": [(2, 16, 32, 512)]}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why implementation `name` cannot run on `device`, or None when it can."""
    if name.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed"
    if name == "liger-triton" and device.type != "cuda":
        return "Triton kernel: CUDA only"
    return None


def available(name: str, device: torch.device | str = "cpu") -> bool:
    return unavailable_reason(name, torch.device(device)) is None


def flops(batch: int, steps: int, hidden_size: int, vocab: int) -> int:
    return 6 * batch * steps * hidden_size * vocab


def make_inputs(batch, steps, hidden_size, vocab, dtype=torch.float32, device="cpu", seed=0):
    """lm_head inputs and a rollout whose old log-probs sit near the current ones (ratios near 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    # normal_ in place: no temporary of the weight's size raises the peak before the measurement
    hidden = torch.empty(batch, steps, hidden_size, dtype=dtype, device=device).normal_(generator=gen)
    weight = torch.empty(vocab, hidden_size, dtype=dtype, device=device).normal_(0.0, 0.05, generator=gen)
    targets = torch.randint(0, vocab, (batch, steps), generator=gen, device=device)
    with torch.no_grad():
        logps = gk.token_logprobs(hidden, weight, targets)
    old_logps = logps + 0.01 * torch.randn(logps.shape, generator=gen, device=device)
    advantages = torch.randn(batch, generator=gen, device=device)
    mask = torch.ones(batch, steps, dtype=torch.long, device=device)
    hidden.requires_grad_()
    weight.requires_grad_()
    return dict(hidden=hidden, weight=weight, targets=targets, old_logps=old_logps, advantages=advantages, mask=mask)


def make_step(name, inputs):
    """One forward + backward of implementation `name` on `inputs`; gradients land in .grad."""
    hidden, weight, targets = inputs["hidden"], inputs["weight"], inputs["targets"]
    old_logps, advantages, mask = inputs["old_logps"], inputs["advantages"], inputs["mask"]
    options = dict(level="sequence", eps_low=EPS_LOW, eps_high=EPS_HIGH)
    if name == "reference":
        def loss():
            return reference.fused_linear_gspo_loss_reference(
                hidden, weight, targets, old_logps, advantages, mask, **options)[0]
    elif name in ("fused", "fused_recompute", "fused_torch"):
        budget = {} if name == "fused" else dict(chunk_budget_mib=0)

        def loss():
            # a fresh context each call: a generator-based context manager cannot be entered twice
            with gk.use_backend("torch") if name == "fused_torch" else contextlib.nullcontext():
                return gk.fused_linear_gspo_loss(
                    hidden, weight, targets, old_logps, advantages, mask, **options, **budget)[0]
    elif name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(
            beta=0.0, compiled=False, use_ref_model=False, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
            loss_type="grpo", importance_sampling_level="sequence",
        )

        def loss():
            return module(hidden, weight, targets, mask, advantages, old_per_token_logps=old_logps)[0]
    elif name == "liger-triton":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        # it reads logits [B, T, V] against T-1 completion tokens, all contiguous
        old, completion, completion_mask = (t[:, :-1].contiguous() for t in (old_logps, targets, mask))

        def loss():
            return triton_grpo_loss(
                hidden @ weight.T, old, None, completion, advantages, completion_mask, temperature=1.0,
                beta=0.0, eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_type="grpo",
                importance_sampling_level="sequence", reduce=True,
            )[0]
    else:
        raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")

    def step():
        hidden.grad = weight.grad = None
        loss().backward()

    return step


def cases(device: torch.device, scale: str) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = []
    for shape in SHAPES[scale]:
        def builder(name, shape=shape):
            return lambda: make_step(name, make_inputs(*shape, dtype=dtype, device=device))

        batch, steps, hidden_size, vocab = shape
        reasons = {name: unavailable_reason(name, device) for name in IMPLEMENTATIONS}
        result.append(Case(
            kernel="fused-linear",
            name=f"B={batch} T={steps} H={hidden_size} V={vocab} {str(dtype).removeprefix('torch.')}",
            unit="TFLOP/s",
            work=flops(*shape),
            builders={name: builder(name) for name, why in reasons.items() if why is None},
            skipped={name: why for name, why in reasons.items() if why is not None},
            max_rounds=5,
        ))
    return result
