"""Rollout samples -> one packed row per micro-batch: no padding in the model, the experts or the loss.

A micro-batch's sequences (prompt + completion minus the last token, as batching.collate lays
them) are concatenated into input_ids [1, N]; position ids restart at each sequence and
attention stays inside it (model/packed.py). The loss is per sequence, so the completion
positions are gathered back into one row per sample, [B, C] with C the longest completion:
the fused loss computes only the positions the mask marks, so the gather's padding costs a
few hidden-state copies, never an lm_head row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gspo_engine.batching import Sample
from gspo_engine.model import PackedSequences


@dataclass
class PackedBatch:
    """A micro-batch packed into one row of N tokens, with its completions laid out per sample.

    input_ids [1, N] and position_ids [1, N] ([3, 1, N] when a sample has images: multimodal RoPE);
    packed: the sequences' boundaries; vision: per sample its PromptVision or None (None when no sample
    has images). completion_index
    [B, C] holds, for each sample's t-th completion token, the packed column whose output predicts
    it (0 past the sample's completion); targets, mask [B, C] as in TrainBatch, over completions only.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    packed: PackedSequences
    completion_index: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor  # [B] fp32
    completion_lengths: list[int]
    vision: list | None = None

    # The interface of batching.TrainBatch that the update and scoring use.

    def loss_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, C, H] from the packed hidden states [1, N, H]: each sample's completion-predicting positions, 0 past them.

        Only the real rows are gathered (index_select: its backward is one index_add_ over them),
        then placed; gathering the padding too would add its zero gradients into one row, serially.
        """
        rows = hidden[0].index_select(0, self.completion_index[self.mask])
        out = rows.new_zeros((*self.mask.shape, hidden.shape[-1]))
        out[self.mask] = rows
        return out

    def scored_rows(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [1, M, H] and targets [1, M] of the M completion tokens, samples in order, no padding."""
        return hidden[0].index_select(0, self.completion_index[self.mask])[None], self.targets[self.mask][None]

    def split_scores(self, logps: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, its completion tokens' values from the [1, M] scores of `scored_rows`."""
        return list(logps[0].split(self.completion_lengths))

    def split_positions(self, per_position: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the values [n_b, ...] of its own positions from per_position [1, N, ...]."""
        return list(per_position[0].split(self.packed.lengths))

    @property
    def real_tokens(self) -> None:
        """Every position of a packed row holds a token."""
        return None

    def scatter(self, per_sample: list[torch.Tensor]) -> torch.Tensor:
        """[B, C] fp32 holding each sample's completion values at its mask positions, 0 elsewhere."""
        out = torch.zeros(self.mask.shape, dtype=torch.float32, device=self.mask.device)
        out[self.mask] = torch.cat([v.to(torch.float32) for v in per_sample]).to(self.mask.device)
        return out


def pack(samples: list[Sample], device: torch.device | str = "cpu") -> PackedBatch:
    lengths = [sample.num_positions for sample in samples]
    completion_lengths = [len(sample.completion_ids) for sample in samples]
    width = max(max(completion_lengths), 1)
    input_ids = torch.empty(sum(lengths), dtype=torch.long)
    completion_index = torch.zeros(len(samples), width, dtype=torch.long)
    targets = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    start = 0
    for row, sample in enumerate(samples):
        tokens = sample.prompt_ids + sample.completion_ids
        n, c = lengths[row], completion_lengths[row]
        input_ids[start : start + n] = torch.tensor(tokens[:-1], dtype=torch.long)
        # Position p predicts token p + 1: the completion's tokens are predicted by the last prompt
        # position and every completion position but the last.
        first = start + len(sample.prompt_ids) - 1
        completion_index[row, :c] = torch.arange(first, first + c)
        targets[row, :c] = torch.tensor(sample.completion_ids, dtype=torch.long)
        mask[row, :c] = True
        start += n
    packed = PackedSequences.from_lengths(lengths, device)
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    position_ids, vision = packed.position_ids(), None
    if any(sample.vision is not None for sample in samples):
        vision = [sample.vision for sample in samples]
        position_ids = torch.cat([
            torch.arange(n, device=device).expand(3, n) if v is None else v.sequence_position_ids(n).to(device)
            for v, n in zip(vision, lengths)
        ], dim=1)[:, None]
    return PackedBatch(
        input_ids[None].to(device), position_ids, packed, completion_index.to(device), targets.to(device),
        mask.to(device), advantages.to(device), completion_lengths, vision,
    )


def split_packed_micro_batches(samples: list[Sample], token_budget: int) -> list[list[Sample]]:
    """Consecutive groups whose tokens (no padding) stay within `token_budget`.

    A sequence longer than the budget gets a micro-batch of its own.
    """
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    tokens = 0
    for sample in samples:
        if current and tokens + sample.num_positions > token_budget:
            batches.append(current)
            current, tokens = [], 0
        current.append(sample)
        tokens += sample.num_positions
    if current:
        batches.append(current)
    return batches
