"""gspo_kernels: fused GSPO loss kernels for any PyTorch trainer (Triton on CUDA, PyTorch elsewhere)."""

from gspo_kernels import reference
from gspo_kernels.backend import use_backend
from gspo_kernels.expert_order import ExpertOrder
from gspo_kernels.fused_linear import (
    DEFAULT_CHUNK_BUDGETS_MIB,
    LinearGSPOLoss,
    default_chunk_budget_mib,
    fused_linear_gspo_loss,
    token_logprobs,
)
from gspo_kernels.fused_linear_stream import STREAM_TILES, stream_tile
from gspo_kernels.loss import gspo_loss
from gspo_kernels.moe import (
    grouped_matmul,
    grouped_weight_grad,
    moe_experts,
    moe_route,
    routed_experts,
    sort_by_expert,
    sum_over_slots,
    validate_expert_indices,
    validate_experts_shapes,
)

__all__ = [
    # What a trainer calls.
    "LinearGSPOLoss",
    "fused_linear_gspo_loss",
    "gspo_loss",
    "moe_experts",
    "moe_route",
    "reference",
    "token_logprobs",
    "use_backend",
    # Building blocks: the pieces of the public functions that code composing its own variants
    # (grouped-expert LoRA, expert parallelism, a memory planner) uses directly.
    "DEFAULT_CHUNK_BUDGETS_MIB",  # fused_linear_gspo_loss's default bound on the logits it keeps, per device type
    "default_chunk_budget_mib",  # that bound for a device
    "STREAM_TILES",  # rows x vocabulary entries of one streamed lm_head tile, per device type
    "stream_tile",  # that tile for a device
    "ExpertOrder",  # the (token, slot) pairs sorted by expert, with per-expert counts and first rows
    "routed_experts",  # moe_experts for moe_route's own indices: no range check, no wait for the device
    "sort_by_expert",  # topk_idx [N, k] -> its ExpertOrder
    "grouped_matmul",  # rows in expert order [S, K] times each expert's [K, M] -> [S, M]
    "grouped_weight_grad",  # per-expert sum over its rows of a^T b -> [E, M, K]
    "sum_over_slots",  # rows in expert order [N*k, H] -> [N, H], summed per token in fp32
    "validate_experts_shapes",  # moe_experts' argument checks, without the range of topk_idx
    "validate_expert_indices",  # integer expert indices in [0, E)
]
