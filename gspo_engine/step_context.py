"""Where a training step's tensors live and how they are computed, shared by scoring and the update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gspo_engine.batching import Sample, TrainBatch, collate, equalize_micro_batches, split_micro_batches
from gspo_engine.device import autocast
from gspo_engine.distributed.runtime import Runtime
from gspo_engine.model import Qwen3Model


@dataclass
class StepContext:
    runtime: Runtime
    device: torch.device
    precision: str  # "fp32" or "bf16-mixed"
    pad_id: int
    temperature: float  # of the sampler, so the loss scores the distribution the tokens were drawn from
    micro_batch_tokens: int

    def autocast(self):
        return autocast(self.device, self.precision)

    def collate(self, samples: list[Sample]) -> TrainBatch:
        return collate(samples, self.pad_id, self.device)

    def head_inputs(self, hidden: torch.Tensor, model: Qwen3Model) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states and lm_head weight in the compute dtype: bf16 under bf16-mixed (autocast does
        not reach the fused kernels, and the final norm returns fp32), else the hidden states' dtype."""
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else hidden.dtype
        return hidden.to(dtype), model.lm_head_weight.to(dtype)

    def micro_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        """Micro-batches under the token budget; on several ranks, as many on each (empty ones pad).

        Every forward and backward of a sharded model gathers weights with all ranks, so each rank
        must run the same number of them.
        """
        micro = split_micro_batches(samples, self.micro_batch_tokens)
        if not self.runtime.distributed:
            return micro
        return equalize_micro_batches(micro, int(self.runtime.max([len(micro)])[0]))
