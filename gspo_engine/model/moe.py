"""Qwen3-MoE sparse block: a softmax router over E experts, top-k, SwiGLU experts held as grouped tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gspo_engine.model.args import ModelArgs
from gspo_kernels.moe import moe_experts
from gspo_kernels.reference import moe_experts_reference, moe_route_reference


@dataclass
class Routing:
    """What one MoE layer decided, for load metrics, the aux loss and routing replay.

    router_logits [N, E] in the model dtype, expert_indices [N, k] (int64), N = B * T.
    """

    router_logits: torch.Tensor
    expert_indices: torch.Tensor


def route(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, forced_experts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_weights fp32 [N, k] and topk_idx [N, k] from router_logits [N, E].

    With forced_experts [N, k] (routing replay) the experts are given, and their weights are still
    the softmax of the current logits, so the router keeps its gradient.
    """
    if forced_experts is None:
        return moe_route_reference(router_logits, top_k, norm_topk_prob=norm_topk_prob)
    probs = torch.softmax(router_logits.to(torch.float32), dim=-1)
    weights = probs.gather(-1, forced_experts)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, forced_experts


def grouped_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """y [N, H] = sum over the k chosen experts of weight * SwiGLU_expert(x).

    The one place the expert computation is chosen (the plain PyTorch reference for now).
    """
    return moe_experts_reference(x, topk_idx, topk_weights, w_gate_up, w_down)


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        experts, hidden, inter = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.router = nn.Linear(hidden, experts, bias=False)
        # gate rows first, then up rows: the layout of transformers' fused Qwen3MoeExperts.gate_up_proj.
        # Initialised as transformers does (normal, std 0.02); a checkpoint overwrites them.
        self.gate_up = nn.Parameter(torch.empty(experts, 2 * inter, hidden).normal_(0, 0.02))
        self.down = nn.Parameter(torch.empty(experts, hidden, inter).normal_(0, 0.02))

    def forward(
        self, x: torch.Tensor, forced_experts: torch.Tensor | None = None, generating: bool = False
    ) -> tuple[torch.Tensor, Routing]:
        """x [B, T, H] -> [B, T, H]; forced_experts [B, T, k] or [N, k] replays a recorded routing.

        generating (a forward with a KV cache) runs the experts through gspo_kernels' dispatch:
        a decode step holds a few tokens, and on a GPU the reference loop waits for the device
        once per expert, the dispatch once (its check of the expert indices).
        """
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        router_logits = self.router(flat)
        if forced_experts is not None:
            forced_experts = forced_experts.reshape(flat.shape[0], self.top_k).to(torch.int64)
        weights, experts = route(router_logits, self.top_k, self.norm_topk_prob, forced_experts)
        # transformers rounds the routing weights to the model dtype before the experts use them.
        experts_fn = moe_experts if generating else grouped_experts
        out = experts_fn(flat, experts, weights.to(x.dtype), self.gate_up, self.down)
        return out.view(batch, seq, hidden), Routing(router_logits, experts)


def switch_aux_loss(routing: Routing, num_experts: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch Transformer load-balancing loss of one layer (Fedus et al. 2021, eqs. 4-6), fp32 scalar.

    num_experts * sum_e f_e * P_e, f_e the share of top-k slots sent to expert e (summing to k, as
    transformers counts them), P_e the mean router probability; padding tokens (token_mask [N] == 0)
    are left out. Equal to transformers' load_balancing_loss_func on a single layer.
    """
    probs = torch.softmax(routing.router_logits.to(torch.float32), dim=-1)
    k = routing.expert_indices.shape[-1]
    mask = torch.ones(probs.shape[0], device=probs.device) if token_mask is None else token_mask.float()
    counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
        0, routing.expert_indices.reshape(-1), mask.repeat_interleave(k)
    )
    tokens = mask.sum().clamp(min=1)
    tokens_per_expert = counts / tokens
    prob_per_expert = (probs * mask[:, None]).sum(dim=0) / tokens
    return num_experts * (tokens_per_expert * prob_per_expert).sum()
