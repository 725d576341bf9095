"""Which implementation a kernel call runs: Triton, the PyTorch CPU path, or the plain reference.

By default CUDA tensors run the Triton kernels and every other device runs the PyTorch path
(same algorithm, same chunking). Tests and benchmarks force a backend to compare them on the
same inputs, either for a block of code (`with use_backend("triton"): ...`) or for a whole
process (`GSPO_KERNELS_BACKEND=torch`). Forcing "triton" on CPU tensors needs
`TRITON_INTERPRET=1` set before triton is imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "GSPO_KERNELS_BACKEND"

_forced: list[str] = []


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force `name` for every kernel call inside the block."""
    _forced.append(_check(name))
    try:
        yield
    finally:
        _forced.pop()


def resolve_backend(tensor: torch.Tensor, cuda_default: str = "triton") -> str:
    """The backend a call on `tensor` runs: the forced one, else `cuda_default` on CUDA, torch elsewhere.

    cuda_default is "torch" for a kernel family whose PyTorch path, on cuBLAS, measured faster on
    a GPU than its Triton kernels; forcing "triton" still runs those.
    """
    name = _forced[-1] if _forced else _check(os.environ.get(ENV_VAR, "auto") or "auto")
    if name == "auto":
        name = cuda_default if tensor.is_cuda and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise RuntimeError("the triton backend was requested but triton is not installed")
    if name == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the triton backend runs CUDA tensors, got a {tensor.device.type} tensor: move the inputs to the GPU, "
            "or set TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's interpreter"
        )
    return name
