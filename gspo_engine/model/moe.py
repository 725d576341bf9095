"""Qwen3-MoE sparse block: a softmax router over E experts, top-k, SwiGLU experts held as grouped tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gspo_engine.model.args import ModelArgs
import gspo_kernels as gk


@dataclass
class Routing:
    """What one MoE layer decided, for load metrics, the aux loss and routing replay.

    router_logits [N, E] in the model dtype, expert_indices [N, k] (int64), N = B * T.
    """

    router_logits: torch.Tensor
    expert_indices: torch.Tensor


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
        # Per-expert LoRA on gate_up and down (gspo_engine.lora.experts.ExpertLoRA), set when LoRA
        # targets the experts; it runs the experts in place of the fused kernel.
        self.expert_lora: nn.Module | None = None
        # Set by distributed.expert_sharding.shard_experts under expert parallelism: this rank holds
        # a block of the experts (gate_up / down are DTensors) and the tokens travel to their owners.
        self.expert_exchange = None

    def forward(self, x: torch.Tensor, forced_experts: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """x [B, T, H] -> [B, T, H]; forced_experts [B, T, k] or [N, k] replays a recorded routing.

        Routing and experts run through gspo_kernels' MoE dispatch (Triton on a GPU, a grouped
        PyTorch path elsewhere). With forced experts (routing replay) the weights are still the
        softmax of the current router logits, so the router keeps its gradient.
        """
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        router_logits = self.router(flat)
        if forced_experts is not None:
            forced_experts = forced_experts.reshape(flat.shape[0], self.top_k).to(torch.int64)
        weights, experts = gk.moe_route(
            router_logits, self.top_k, norm_topk_prob=self.norm_topk_prob, forced_experts=forced_experts
        )
        # transformers rounds the routing weights to the model dtype before the experts use them. Autocast
        # does not reach a custom kernel, so under autocast the activations and the fp32 master weights are
        # cast to its compute dtype here, as it would cast them for a matmul.
        device_type = flat.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else flat.dtype
        # moe_route's indices are in range by construction: routed_experts skips moe_experts' range check,
        # which waits for the device (at every decode step) and cannot run inside a CUDA graph capture.
        run_experts = gk.routed_experts if self.expert_lora is None else self.expert_lora
        if self.expert_exchange is not None:
            # It casts this rank's block of experts to the tokens' dtype itself (after the gradient's sum over
            # replicas, which so stays in fp32).
            out = self.expert_exchange(flat.to(dtype), experts, weights.to(dtype), self.gate_up, self.down)
        else:
            out = run_experts(flat.to(dtype), experts, weights.to(dtype), self.gate_up.to(dtype), self.down.to(dtype))
        return out.to(x.dtype).view(batch, seq, hidden), Routing(router_logits, experts)


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
