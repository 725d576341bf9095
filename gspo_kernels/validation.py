"""Pieces of the argument checks that the public functions share.

Every public function raises ValueError naming the offending argument, with its shape and dtype,
before any kernel runs; these helpers keep those messages and checks alike across the families.
"""

from __future__ import annotations

import torch


def describe(name: str, tensor: torch.Tensor) -> str:
    """How a message names a tensor argument: `logps (2, 5) float32`."""
    return f"{name} {tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"


def require_tensor(name: str, value) -> None:
    """Raise ValueError unless `value` is a torch.Tensor."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def holds_integers(tensor: torch.Tensor) -> bool:
    """Whether the dtype of `tensor` is an integer type (bool does not count)."""
    dtype = tensor.dtype
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def value_range(tensor: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor, read with one host sync for both."""
    low, high = torch.stack(torch.aminmax(tensor)).tolist()
    return low, high
