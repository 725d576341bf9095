"""The policy update: per minibatch, micro-batches -> fused lm_head + GSPO loss -> backward -> clip -> AdamW.

On several ranks, each rank's minibatch is its share of the global one; the loss is normalised by
the global number of valid sequences and the gradients are summed (parallelize), so the update
equals one process's on the whole batch.
"""

from __future__ import annotations

import logging
import math

import torch

import gspo_kernels as gk
from gspo_engine.batching import Sample, split_minibatches
from gspo_engine.config import GSPOConfig
from gspo_engine.distributed.grad_norm import clip_grad_norm
from gspo_engine.errors import TrainingError
from gspo_engine.model import Qwen3Model
from gspo_engine.step_context import Batch, StepContext

logger = logging.getLogger(__name__)

# Loss metrics averaged over the minibatch's sequences, and over its response tokens.
PER_SEQUENCE = ("loss", "ratio_mean")
PER_TOKEN = ("clip_frac", "clip_frac_low", "clip_frac_high", "kl")


class PolicyUpdate:
    def __init__(self, context: StepContext, model: Qwen3Model, optimizer: torch.optim.Optimizer, gspo: GSPOConfig,
                 max_grad_norm: float, routing_replay: bool, max_consecutive_skips: int):
        self.context = context
        self.model = model
        self.optimizer = optimizer
        self.gspo = gspo
        self.max_grad_norm = max_grad_norm
        self.routing_replay = routing_replay and model.args.is_moe
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_updates = 0
        self.consecutive_skips = 0

    def run(self, samples: list[Sample]) -> dict:
        """One optimizer step per minibatch; the metrics are averaged over the minibatches."""
        runtime = self.context.runtime
        minibatches = split_minibatches(samples, self.gspo.num_minibatches)
        totals: dict[str, float] = {}
        imbalance: list[float] = []
        self.model.train()
        for minibatch in minibatches:
            stats = self.accumulate_gradients(minibatch)
            imbalance.extend(stats.pop("expert_imbalance", []))
            stats = dict(zip(stats, runtime.sum(list(stats.values()))))
            stats["grad_norm"] = self.step_optimizer(stats["loss"])
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / len(minibatches)
        if runtime.distributed and self.model.args.is_moe:
            imbalance = [runtime.max([max(imbalance, default=0.0)])[0]]
        if imbalance:
            totals["expert_imbalance"] = max(imbalance)
        return totals

    def step_optimizer(self, loss: float) -> float:
        """Clip and step, or skip the step when the loss or the gradient is not finite; the gradient norm."""
        # Listed after the backward: FSDP2 swaps its units' gathered parameters for the sharded
        # ones (which hold the gradients) only once their gradients are reduced.
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm(params, self.max_grad_norm)  # also across meshes (expert parallelism)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.consecutive_skips = 0
        else:
            self.skipped_updates += 1
            self.consecutive_skips += 1
            logger.warning("non-finite loss %s or grad norm %s; update skipped", loss, grad_norm)
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise TrainingError(
                    f"{self.consecutive_skips} non-finite updates in a row (train.max_consecutive_skips); stopping."
                )
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def accumulate_gradients(self, minibatch: list[Sample]) -> dict:
        """Backward of the minibatch's loss (a mean over its valid sequences), micro-batch by micro-batch.

        A micro-batch's loss is the mean over its own valid sequences (those with a completion
        token); weighted by its share of the minibatch's valid sequences (over all ranks), the
        micro-batch gradients sum to the minibatch's exactly. The statistics returned are this
        rank's parts of the minibatch's: summed over ranks they are the minibatch's.
        """
        context = self.context
        stats = dict.fromkeys(PER_SEQUENCE + PER_TOKEN, 0.0)
        if self.model.args.router_aux_loss:
            stats["aux_loss"] = 0.0
        imbalance = []
        minibatch_sequences, minibatch_tokens = context.runtime.sum(
            [count_valid(minibatch), sum(len(s.completion_ids) for s in minibatch)]
        )
        for micro in context.micro_batches(minibatch):
            if not micro:
                # Padding for the ranks with more micro-batches: a forward and backward that add nothing.
                with context.autocast():
                    loss, _, aux_loss, _ = self.micro_batch_loss(context.collate(minibatch[:1]), minibatch[:1])
                (with_aux(loss, aux_loss) * 0.0).backward()
                continue
            batch = context.collate(micro)
            sequence_share = count_valid(micro) / max(minibatch_sequences, 1)
            token_share = batch.mask.sum().item() / max(minibatch_tokens, 1)
            with context.autocast():
                loss, metrics, aux_loss, routing = self.micro_batch_loss(batch, micro)
            (with_aux(loss, aux_loss) * sequence_share).backward()
            metrics["loss"] = loss.detach()
            for key in PER_SEQUENCE:
                stats[key] += float(metrics[key]) * sequence_share
            for key in PER_TOKEN:
                stats[key] += float(metrics[key]) * token_share
            if aux_loss is not None:
                stats["aux_loss"] += float(aux_loss.detach()) * sequence_share
            if routing:
                imbalance.append(expert_imbalance(routing, batch.real_tokens, self.model.args.num_experts))
        if imbalance:
            stats["expert_imbalance"] = imbalance
        return stats

    def micro_batch_loss(self, batch: Batch, micro: list[Sample]):
        """(loss, loss metrics, aux loss or None, routing) of one micro-batch; the logits are never built."""
        gspo = self.gspo
        records = [s.old_routing for s in micro] if self.routing_replay else None
        # The padding mask only matters to the aux loss, which must not count padding.
        output = self.context.forward(self.model, batch, records, mask_padding=bool(self.model.args.router_aux_loss))
        hidden, weight = self.context.head_inputs(batch.loss_hidden(output.hidden_states), self.model)
        ref = batch.scatter([s.ref_logps for s in micro]) if gspo.beta > 0 else None
        loss, metrics = gk.fused_linear_gspo_loss(
            hidden, weight, batch.targets, batch.scatter([s.old_logps for s in micro]), batch.advantages, batch.mask,
            temperature=self.context.temperature, level=gspo.level, eps_low=gspo.eps_low, eps_high=gspo.eps_high,
            ref_logps=ref, beta=gspo.beta,
        )
        return loss, metrics, output.aux_loss, output.routing


def count_valid(samples: list[Sample]) -> int:
    """Sequences the loss counts: those with at least one completion token."""
    return sum(1 for s in samples if s.completion_ids)


def with_aux(loss: torch.Tensor, aux_loss: torch.Tensor | None) -> torch.Tensor:
    return loss if aux_loss is None else loss + aux_loss


def expert_imbalance(routing, real_tokens: torch.Tensor | None, num_experts: int) -> float:
    """Max over MoE layers of (most tokens any expert got) / (mean tokens per expert), real tokens only.

    real_tokens: bool [N] marking the forward's positions that hold a token; None when all do.
    """
    worst = 0.0
    for layer in routing:
        experts = layer.expert_indices if real_tokens is None else layer.expert_indices[real_tokens]
        counts = torch.bincount(experts.reshape(-1), minlength=num_experts)
        worst = max(worst, float(counts.max() / counts.float().mean().clamp(min=1e-9)))
    return worst
