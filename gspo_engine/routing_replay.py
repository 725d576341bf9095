"""Routing replay: the experts the old policy chose, recorded per token and forced in the update.

A sequence's record is int16 [positions, num_moe_layers, k]: for every input position of the
training forward (the prompt and every completion token but the last), the k experts each MoE
layer routed it to. int16 keeps long rollouts' records small; expert ids stay under 32,768.
"""

from __future__ import annotations

import torch

from gspo_engine.model.moe import Routing


def stack_routing(routing: list[Routing], rows: int, length: int) -> torch.Tensor:
    """int16 [rows, length, num_moe_layers, k] from one forward's Routing per MoE layer ([rows * length, k] each)."""
    return torch.stack([r.expert_indices.view(rows, length, -1) for r in routing], dim=2).to(torch.int16)


def replay_experts(records: list[torch.Tensor], length: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Per MoE layer, int64 [B, length, k] for Qwen3Model.forward_hidden(forced_experts=...) on a right-padded batch.

    records: one per row, [n_b, num_moe_layers, k] with n_b <= length, placed at positions
    0..n_b-1 of their row, as batching.collate lays out the tokens. Padding positions get experts
    0..k-1: no loss reads their outputs.
    """
    _, num_layers, k = records[0].shape
    forced = torch.arange(k, dtype=torch.int64).expand(len(records), length, num_layers, k).clone()
    for row, experts in enumerate(records):
        forced[row, : experts.shape[0]] = experts
    return list(forced.to(device).unbind(dim=2))


def replay_experts_packed(records: list[torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Per MoE layer, int64 [1, N, k] for a packed forward: the rows' records end to end, as packing.pack lays
    out their tokens (N = the records' positions summed)."""
    forced = torch.cat(records).to(device=device, dtype=torch.int64)
    return [layer[None] for layer in forced.unbind(dim=1)]
