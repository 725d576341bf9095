"""Where a training step's tensors live and how they are computed, shared by scoring and the update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gspo_engine.batching import Sample, TrainBatch, collate, equalize_micro_batches, split_micro_batches
from gspo_engine.device import autocast
from gspo_engine.distributed.runtime import Runtime
from gspo_engine.model import ModelOutput, Qwen3Model
from gspo_engine.packing import PackedBatch, pack, split_packed_micro_batches
from gspo_engine.routing_replay import replay_experts, replay_experts_packed

Batch = TrainBatch | PackedBatch


@dataclass
class StepContext:
    runtime: Runtime
    device: torch.device
    precision: str  # "fp32" or "bf16-mixed"
    pad_id: int
    temperature: float  # of the sampler, so the loss scores the distribution the tokens were drawn from
    micro_batch_tokens: int
    packing: bool = True  # packed rows (packing.py) or right-padded ones (batching.collate)

    def autocast(self):
        return autocast(self.device, self.precision)

    def collate(self, samples: list[Sample]) -> Batch:
        if self.packing:
            return pack(samples, self.device)
        if any(sample.vision is not None for sample in samples):
            raise ValueError("prompts with images need packed micro-batches: set gspo.packing: true")
        return collate(samples, self.pad_id, self.device)

    def forward(self, model: Qwen3Model, batch: Batch, routing_records: list[torch.Tensor] | None = None,
                mask_padding: bool = False) -> ModelOutput:
        """The model's forward_hidden on a batch; routing_records (one per sample) force the recorded experts.

        mask_padding passes a padded batch's padding mask, which only the aux loss needs (causal
        attention never lets a real token see the right padding after it).
        """
        if isinstance(batch, PackedBatch):
            forced = None if routing_records is None else replay_experts_packed(routing_records, self.device)
            # A Qwen3-VL batch with images: their features (stored, or computed again by a tower that trains).
            images = {} if batch.vision is None else {"visions": batch.vision}
            return model.forward_hidden(batch.input_ids, position_ids=batch.position_ids, forced_experts=forced,
                                        packed=batch.packed, **images)
        length = batch.input_ids.shape[1]
        forced = None if routing_records is None else replay_experts(routing_records, length, self.device)
        attention_mask = batch.real.long() if mask_padding else None
        return model.forward_hidden(batch.input_ids, attention_mask=attention_mask, forced_experts=forced)

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
        split = split_packed_micro_batches if self.packing else split_micro_batches
        micro = split(samples, self.micro_batch_tokens)
        if not self.runtime.distributed:
            return micro
        return equalize_micro_batches(micro, int(self.runtime.max([len(micro)])[0]))
