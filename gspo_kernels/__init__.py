"""gspo_kernels: fused GSPO loss kernels for any PyTorch trainer (Triton on CUDA, PyTorch elsewhere)."""

from gspo_kernels import reference
from gspo_kernels.backend import use_backend

__all__ = ["reference", "use_backend"]
