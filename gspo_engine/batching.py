"""Rollout samples -> padded training tensors, minibatches and token-budgeted micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """One completion of one prompt, with what the update needs to score it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float = 0.0
    rollout_logps: torch.Tensor | None = None  # [len(completion_ids)] from the sampler
    old_logps: torch.Tensor | None = None  # [len(completion_ids)], set before the update
    ref_logps: torch.Tensor | None = None  # [len(completion_ids)] under the reference policy (beta > 0)
    reward: float = 0.0
    # Routing replay: the old policy's experts, int16 [num_positions, num_moe_layers, k] (routing_replay.py).
    old_routing: torch.Tensor | None = None
    # A Qwen3-VL prompt with images: its model.qwen3_vl.PromptVision (features, positions), shared by the group.
    vision: object | None = None

    @property
    def num_positions(self) -> int:
        """Positions the training forward runs: prompt + completion minus the last token."""
        return len(self.prompt_ids) + len(self.completion_ids) - 1


@dataclass
class TrainBatch:
    """Right-padded tensors where position t predicts targets[:, t].

    input_ids, targets, mask [B, L]; mask is 1 where the target is a completion token;
    real [B, L] is 1 on every position that holds a token rather than padding. Right padding
    keeps every real token at its natural position, so attention needs no mask: causal
    attention never lets a real token see the padding after it.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    real: torch.Tensor
    advantages: torch.Tensor  # [B] fp32

    def scatter(self, per_sample: list[torch.Tensor]) -> torch.Tensor:
        """[B, L] fp32 holding each sample's completion values at its mask positions, 0 elsewhere."""
        out = torch.zeros(self.mask.shape, dtype=torch.float32, device=self.mask.device)
        out[self.mask] = torch.cat([v.to(torch.float32) for v in per_sample]).to(self.mask.device)
        return out

    # The interface the update and scoring use, shared with packing.PackedBatch.

    def loss_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, H] laid out like targets and mask: the forward's own."""
        return hidden

    def scored_rows(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and targets to score for the completions' log-probs: every position of every row."""
        return hidden, self.targets

    def split_scores(self, logps: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, its completion tokens' values from the [B, L] scores of `scored_rows`."""
        return [logps[row][self.mask[row]] for row in range(logps.shape[0])]

    def split_positions(self, per_position: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the values [n_b, ...] of its own positions from per_position [B, L, ...]."""
        lengths = self.real.sum(dim=1).tolist()
        return [per_position[row, :n] for row, n in enumerate(lengths)]

    @property
    def real_tokens(self) -> torch.Tensor:
        """bool [B * L]: which of the forward's positions hold a token."""
        return self.real.reshape(-1)


def collate(samples: list[Sample], pad_id: int, device: torch.device | str = "cpu") -> TrainBatch:
    length = max(sample.num_positions for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    real = torch.zeros(len(samples), length, dtype=torch.bool)
    for row, sample in enumerate(samples):
        tokens = torch.tensor(sample.prompt_ids + sample.completion_ids, dtype=torch.long)
        n = sample.num_positions
        input_ids[row, :n] = tokens[:-1]
        targets[row, :n] = tokens[1:]
        mask[row, len(sample.prompt_ids) - 1 : n] = True
        real[row, :n] = True
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return TrainBatch(input_ids.to(device), targets.to(device), mask.to(device), real.to(device), advantages.to(device))


def split_minibatches(samples: list[Sample], num_minibatches: int) -> list[list[Sample]]:
    """`num_minibatches` contiguous, near-equal slices (sizes differ by at most one)."""
    size, extra = divmod(len(samples), num_minibatches)
    slices, start = [], 0
    for index in range(num_minibatches):
        end = start + size + (1 if index < extra else 0)
        slices.append(samples[start:end])
        start = end
    return [s for s in slices if s]


def split_micro_batches(samples: list[Sample], token_budget: int) -> list[list[Sample]]:
    """Consecutive groups whose padded size (rows x longest row) stays within `token_budget`.

    A sequence longer than the budget gets a micro-batch of its own.
    """
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    longest = 0
    for sample in samples:
        candidate = max(longest, sample.num_positions)
        if current and candidate * (len(current) + 1) > token_budget:
            batches.append(current)
            current, candidate = [], sample.num_positions
        current.append(sample)
        longest = candidate
    if current:
        batches.append(current)
    return batches


def equalize_micro_batches(batches: list[list[Sample]], count: int) -> list[list[Sample]]:
    """`batches` made `count` long: the micro-batch with the most rows is halved until there are
    enough; once every one holds a single row, empty micro-batches pad the list.

    Ranks of a sharded model must run the same number of forwards; smaller micro-batches are
    better padding than idle forwards, and an empty one tells the caller to run one that adds nothing.
    """
    if count < len(batches):
        raise ValueError(f"cannot make {len(batches)} micro-batches into {count}")
    batches = [list(batch) for batch in batches]
    while len(batches) < count:
        widest = max(range(len(batches)), key=lambda index: len(batches[index]), default=None)
        if widest is None or len(batches[widest]) < 2:
            batches.append([])
            continue
        rows = batches[widest]
        half = len(rows) // 2
        batches[widest : widest + 1] = [rows[:half], rows[half:]]
    return batches
