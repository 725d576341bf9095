"""gspo_loss forward + backward against the plain PyTorch reference.

Bytes of one forward + backward, the floor any implementation pays: logps, old_logps,
ref_logps and the bool mask read once, the gradient written once, plus the advantages.
The public peers (Liger-Kernel's chunked and Triton GRPO losses) start from hidden states or
logits, not from log-probs: they are compared in the fused-linear family.
"""

from __future__ import annotations

import torch

import gspo_kernels as gk
from gspo_engine.benchmarks.cases import Case
from gspo_kernels import reference

# B=512, T=2048 is the target shape on a GPU; the smoke shape keeps CPU tests fast.
SHAPES = {"gpu": [(64, 4096), (512, 2048)], "cpu": [(64, 4096), (512, 2048)], "smoke": [(4, 64)]}
IMPLEMENTATIONS = {"reference": reference.gspo_loss_reference, "gspo_kernels": gk.gspo_loss}
LEVELS = ("sequence", "token")


def loss_bytes(batch: int, length: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    token_arrays = 4  # logps, old_logps, ref_logps, gradient
    return batch * length * (token_arrays * element + 1) + batch * 4


def loss_inputs(batch: int, length: int, dtype: torch.dtype, device: torch.device):
    """Random log-probs near a realistic operating point, ragged response lengths."""
    gen = torch.Generator(device=device).manual_seed(0)
    logps = -torch.rand(batch, length, generator=gen, device=device) * 3
    old_logps = logps + torch.randn(batch, length, generator=gen, device=device) * 1e-3
    ref_logps = logps + torch.randn(batch, length, generator=gen, device=device) * 0.1
    advantages = torch.randn(batch, generator=gen, device=device)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=gen, device=device)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]
    return logps.to(dtype).requires_grad_(), old_logps.to(dtype), advantages, mask, ref_logps.to(dtype)


def loss_step(implementation: str, inputs, level: str):
    """One forward + backward of `implementation` on `inputs`, as a zero-argument callable."""
    loss_fn = IMPLEMENTATIONS[implementation]
    logps, old_logps, advantages, mask, ref_logps = inputs

    def step():
        logps.grad = None
        loss, _ = loss_fn(logps, old_logps, advantages, mask, level=level, ref_logps=ref_logps, beta=0.01)
        loss.backward()

    return step


def cases(device: torch.device, scale: str) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = []
    for batch, length in SHAPES[scale]:
        for level in LEVELS:
            def builder(implementation, batch=batch, length=length, level=level):
                return lambda: loss_step(implementation, loss_inputs(batch, length, dtype, device), level)

            result.append(Case(
                kernel="loss",
                name=f"{level} B={batch} T={length} {str(dtype).removeprefix('torch.')}",
                unit="GB/s",
                work=loss_bytes(batch, length, dtype),
                builders={name: builder(name) for name in IMPLEMENTATIONS},
            ))
    return result
