"""Expert parallelism for one Qwen3-MoE layer: the token exchange of docs/scaling.md.

Rank r of an EP group of `ep` ranks owns experts [r E / ep, (r + 1) E / ep). Each rank routes its
own n tokens; their n * k (token, slot) pairs, pair p = token * k + slot, travel to the ranks that
own their experts and their output rows travel back:

1. plan: the stable sort of the pairs by expert (`gk.sort_by_expert`). Experts are owned in
   contiguous blocks, so the sorted pairs are also grouped by destination rank, and the
   per-expert counts viewed as [ep, E / ep] are the send counts per (rank, local expert).
2. counts: an all-to-all of that count matrix; row s of what arrives is what source rank s sends
   to each local expert.
3. dispatch: one all-to-all of the hidden rows x[token] in sorted order.
4. compute: the received rows, grouped by (source rank, local expert), run through the grouped
   SwiGLU experts (`gk.moe_experts`, k = 1 per row, unit weight), which re-sort them stably by
   local expert. Only the local expert weights [E / ep, 2I, H] and [E / ep, H, I] are used.
5. combine: the reverse all-to-all returns every pair's output row, in the sorted order it left
   in; the token's home rank scales it by the routing weight and sums the k slots in that order,
   as the single-process path does.

Both all-to-alls are differentiable, backward running them in reverse (torch's functional
collectives, as in torchtitan; torch.distributed.nn.functional's version is deprecated), so
gradients reach x, the routing weights and the local expert weights; an expert weight gradient
sums the pairs of every rank's tokens. Every rank of the group must call `expert_parallel_moe`
(and, in training, its backward) the same number of times in the same order, even with no
tokens: the collectives pair up.

The count exchange also carries one flag per rank (`ExchangeFlags`): whether the rank still has
work of its own. A rank whose generation has ended keeps joining its peers' exchanges with no
tokens of its own until every rank's flag is down (`expert_sharding.finish_in_step`), at no
extra collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

import gspo_kernels as gk


class DispatchPlan(NamedTuple):
    """Where one rank's (token, slot) pairs go: computed from its routing alone, no communication."""

    sorted_pair: torch.Tensor  # [n*k] pair index at each sorted row: grouped by expert, hence by rank
    send_counts: torch.Tensor  # [ep, E/ep] int64: pairs for (destination rank, its local expert)
    top_k: int

    @property
    def send_splits(self) -> list[int]:
        """Rows sent to each destination rank, in rank order (one host sync)."""
        return self.send_counts.sum(dim=1).tolist()


def _check_ep(num_experts: int, ep: int) -> None:
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep must be a positive int (ranks in the expert-parallel group); got {ep!r}")
    if num_experts % ep:
        raise ValueError(
            f"num_experts = {num_experts} is not divisible by ep = {ep}: every rank of the "
            f"expert-parallel group must own the same number of experts (E / ep)"
        )


def plan_dispatch(topk_idx: torch.Tensor, num_experts: int, ep: int) -> DispatchPlan:
    """The send side of the exchange from topk_idx [n, k] (n may be 0).

    Raises ValueError when num_experts is not divisible by ep or topk_idx is not [n, k] in [0, E).
    """
    _check_ep(num_experts, ep)
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be an integer [n, k] tensor; got {tuple(topk_idx.shape)} {topk_idx.dtype}")
    gk.validate_expert_indices("topk_idx", topk_idx, num_experts)
    order = gk.sort_by_expert(topk_idx.to(torch.int64), num_experts)
    return DispatchPlan(order.sorted_pair, order.counts.view(ep, num_experts // ep), topk_idx.shape[1])


@dataclass
class ExchangeFlags:
    """busy: sent with every exchange (this rank still has tokens of its own to run);
    any_busy: what the last exchange received (some rank of the group, this one included, was busy)."""

    busy: bool = True
    any_busy: bool = True


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None = None,
                    flags: ExchangeFlags | None = None) -> torch.Tensor:
    """All-to-all of the [ep, E/ep] count matrices: recv_counts [ep, E/ep], row s = rows from rank s.

    recv_counts[s, e] is the number of pairs source rank s sends to this rank's local expert e.
    With flags, a last column carries each rank's `busy` flag and `flags.any_busy` is set from
    the received ones (the same on every rank of the group).
    """
    busy = 1 if flags is None or flags.busy else 0
    send = torch.cat((send_counts, torch.full_like(send_counts[:, :1], busy)), dim=1)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send.contiguous(), group=group)
    if flags is not None:
        flags.any_busy = bool(received[:, -1].any())
    return received[:, :-1].contiguous()


def received_local_experts(recv_counts: torch.Tensor) -> torch.Tensor:
    """[m]: the local expert of every received row, rows grouped by (source rank, local expert)."""
    ep, local = recv_counts.shape
    experts = torch.arange(local, device=recv_counts.device).repeat(ep)
    return torch.repeat_interleave(experts, recv_counts.reshape(-1))


def expert_parallel_moe(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    local_gate_up: torch.Tensor,
    local_down: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    flags: ExchangeFlags | None = None,
) -> torch.Tensor:
    """The MoE experts' output y [n, H] for this rank's tokens, computed by the ranks that own the experts.

    x [n, H] (n may be 0); topk_idx [n, k] global expert indices in [0, E), E = ep * E/ep;
    topk_weight [n, k] (as from `gk.moe_route`); local_gate_up [E/ep, 2I, H] (gate rows first, then
    up) and local_down [E/ep, H, I]: this rank's block of the model's grouped `gate_up` / `down`
    tensors, in the dtype of x. Equal to `gk.moe_experts(x, topk_idx, topk_weight, gate_up, down)`
    on the full expert tensors; differentiable with respect to x, topk_weight and the local expert
    weights. Collective over `group` (default: the world); whether x requires grad must agree
    across its ranks, since backward runs the reverse all-to-alls.
    """
    gk.validate_experts_shapes(x, topk_idx, topk_weight, local_gate_up, local_down)
    group = group if group is not None else dist.group.WORLD
    ep = dist.get_world_size(group)
    plan = plan_dispatch(topk_idx, local_gate_up.shape[0] * ep, ep)
    recv_counts = exchange_counts(plan.send_counts, group, flags)
    send_splits, recv_splits = plan.send_splits, recv_counts.sum(dim=1).tolist()

    token = plan.sorted_pair // plan.top_k
    received = all_to_all_single_autograd(x[token], recv_splits, send_splits, group)
    local_expert = received_local_experts(recv_counts)
    # Unit weights: the routing weight belongs to the token's home rank, applied after the return trip.
    unit = torch.ones(local_expert.shape[0], 1, dtype=x.dtype, device=x.device)
    expert_rows = gk.moe_experts(received, local_expert[:, None], unit, local_gate_up, local_down)
    returned = all_to_all_single_autograd(expert_rows, send_splits, recv_splits, group)

    # Weighted rows rounded to x's dtype, then summed, as gk.moe_experts' PyTorch path does.
    weighted = (returned * topk_weight.reshape(-1)[plan.sorted_pair, None]).to(x.dtype)
    return gk.sum_over_slots(weighted, plan.sorted_pair, plan.top_k, x.dtype)
