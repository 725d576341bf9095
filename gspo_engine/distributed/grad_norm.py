"""Gradient clipping over parameters that live on different device meshes.

Under expert parallelism the FSDP2 weights are DTensors on the data-parallel mesh and the experts
DTensors on the ("dp", "ep") mesh; torch's clip_grad_norm_ stacks every norm into one tensor,
which DTensor refuses across meshes. Here each mesh's group is reduced to its global norm first,
then the groups are combined; a model without DTensors (one process) takes torch's own path.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Scale the gradients so that their global 2-norm is at most max_norm; the norm before clipping."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        key = grad.device_mesh if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    if len(groups) <= 1:  # one process, or FSDP2 alone: torch's clip
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    squares = 0.0
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, 2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares += float(norm) ** 2
    total = math.sqrt(squares)
    # As torch computes it: max_norm / (norm + 1e-6) in fp32, at most 1.
    coefficient = float(torch.clamp(torch.tensor(max_norm, dtype=torch.float32)
                                    / (torch.tensor(total, dtype=torch.float32) + 1e-6), max=1.0))
    if coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)
    return total
