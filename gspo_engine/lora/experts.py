"""LoRA on the grouped experts of a Qwen3-MoE layer. Our own code: PEFT has no layer for our grouped tensors.

Every expert e has its own low-rank factors on both grouped weights, s = alpha / rank:

    gate_up_e(x) = W_gate_up[e] x + s * B_gate_up[e] (A_gate_up[e] x)    A_gate_up [E, r, H], B_gate_up [E, 2I, r]
    down_e(h)    = W_down[e] h    + s * B_down[e] (A_down[e] h)          A_down    [E, r, I], B_down    [E, H, r]

The (token, slot) pairs are sorted by expert once (gk.sort_by_expert), and every product, base
and low-rank, is one grouped matmul over the sorted rows (torch._grouped_mm on a CPU, a per-expert
matmul loop elsewhere). No per-expert dense weight W + s B A is ever formed: the adapters add
O(S r (H + I)) work and [S, r] activations. The adapter on gate_up changes the pre-activation that
the fused expert kernel keeps to itself, so while the adapters are on the layer runs these grouped
matmuls; with them off (the GSPO reference policy) it runs the fused kernel again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import gspo_kernels as gk


class _GroupedLinear(torch.autograd.Function):
    """rows [S, K] sorted by expert, weight [E, M, K] -> [S, M]: the rows of expert e times weight[e]^T."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, order: gk.ExpertOrder) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.order = order
        return gk.grouped_matmul(rows, weight.transpose(1, 2), order)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_rows = gk.grouped_matmul(grad_out, weight, ctx.order) if ctx.needs_input_grad[0] else None
        # The frozen base weights ask for no gradient: only the adapters' factors pay for this one.
        grad_weight = gk.grouped_weight_grad(grad_out, rows, ctx.order) if ctx.needs_input_grad[1] else None
        return grad_rows, grad_weight, None


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, order: gk.ExpertOrder) -> torch.Tensor:
    return _GroupedLinear.apply(rows, weight, order)


class ExpertLoRA(nn.Module):
    """The adapters of one SparseMoE layer; called in place of gk.moe_experts with the same arguments."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, rank: int, alpha: float):
        super().__init__()
        self.scaling = alpha / rank
        self.enabled = True
        # A as nn.Linear initialises it (what PEFT does), B zero: the adapted layer starts equal to the base.
        self.gate_up_A = nn.Parameter(_uniform((num_experts, rank, hidden)))
        self.gate_up_B = nn.Parameter(torch.zeros(num_experts, 2 * intermediate, rank))
        self.down_A = nn.Parameter(_uniform((num_experts, rank, intermediate)))
        self.down_B = nn.Parameter(torch.zeros(num_experts, hidden, rank))

    def forward(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
    ) -> torch.Tensor:
        """x [N, H], topk_idx / topk_weights [N, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [N, H]."""
        if not self.enabled:
            return gk.moe_experts(x, topk_idx, topk_weights, w_gate_up, w_down)
        order = gk.sort_by_expert(topk_idx, w_gate_up.shape[0])
        token = order.sorted_pair // order.top_k
        gate, up = self._project(x[token], w_gate_up, self.gate_up_A, self.gate_up_B, order).chunk(2, dim=-1)
        rows = self._project(F.silu(gate) * up, w_down, self.down_A, self.down_B, order)
        rows = rows * topk_weights.reshape(-1)[order.sorted_pair, None].to(rows.dtype)
        return gk.sum_over_slots(rows, order.sorted_pair, order.top_k, x.dtype)

    def _project(self, rows, weight, lora_A, lora_B, order):
        low_rank = grouped_linear(grouped_linear(rows, lora_A.to(rows.dtype), order), lora_B.to(rows.dtype), order)
        return grouped_linear(rows, weight, order) + self.scaling * low_rank

    @torch.no_grad()
    def merge_into(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
        """Add s * B_e A_e to every expert's weights, in place (for export)."""
        for weight, lora_A, lora_B in ((w_gate_up, self.gate_up_A, self.gate_up_B), (w_down, self.down_A, self.down_B)):
            delta = torch.bmm(lora_B.to(torch.float32), lora_A.to(torch.float32)) * self.scaling
            weight.copy_((weight.to(torch.float32) + delta).to(weight.dtype))


def _uniform(shape: tuple[int, int, int]) -> torch.Tensor:
    """nn.Linear's default initialisation (kaiming uniform, a = sqrt(5)) of each expert's [r, K] factor."""
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound)
