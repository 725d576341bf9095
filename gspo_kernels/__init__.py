"""gspo_kernels: fused GSPO loss kernels for any PyTorch trainer (Triton on CUDA, PyTorch elsewhere)."""

from gspo_kernels import reference
from gspo_kernels.backend import use_backend
from gspo_kernels.fused_linear import LinearGSPOLoss, fused_linear_gspo_loss, token_logprobs
from gspo_kernels.loss import gspo_loss
from gspo_kernels.moe import moe_experts, moe_route

__all__ = [
    "LinearGSPOLoss",
    "fused_linear_gspo_loss",
    "gspo_loss",
    "moe_experts",
    "moe_route",
    "reference",
    "token_logprobs",
    "use_backend",
]
