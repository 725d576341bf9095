"""gspo_kernels: fused GSPO loss kernels for any PyTorch trainer (Triton on CUDA, PyTorch elsewhere)."""

from gspo_kernels import reference
from gspo_kernels.backend import use_backend
from gspo_kernels.loss import gspo_loss

__all__ = ["gspo_loss", "reference", "use_backend"]
