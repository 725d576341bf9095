"""Log-probs of sampled completions under a policy, without gradients: the old and reference policies."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

import gspo_kernels as gk
from gspo_engine.batching import Sample
from gspo_engine.lora import adapters_disabled, has_lora
from gspo_engine.model import Qwen3Model
from gspo_engine.routing_replay import stack_routing
from gspo_engine.step_context import StepContext


def score_samples(context: StepContext, model: Qwen3Model, samples: list[Sample], attribute: str,
                  record_routing: bool = False) -> None:
    """Per-token log-probs of each completion under `model`, stored on the samples as `attribute`.

    record_routing: also keep each sample's experts (Sample.old_routing) for routing replay.
    """
    model.eval()
    with torch.no_grad(), context.autocast():
        for micro in context.micro_batches(samples):
            if not micro:  # another rank has more micro-batches: join its forwards' weight gathers
                context.forward(model, context.collate(samples[:1]))
                continue
            batch = context.collate(micro)
            output = context.forward(model, batch)
            rows, targets = batch.scored_rows(output.hidden_states)
            hidden, weight = context.head_inputs(rows, model)
            logps = gk.token_logprobs(hidden, weight, targets, temperature=context.temperature)
            for sample, sample_logps in zip(micro, batch.split_scores(logps)):
                setattr(sample, attribute, sample_logps.float().cpu())
            if record_routing and output.routing:
                experts = stack_routing(output.routing, *batch.input_ids.shape).cpu()
                for sample, sample_experts in zip(micro, batch.split_positions(experts)):
                    sample.old_routing = sample_experts
            # Freed before the next micro-batch's forward, not when the names are next assigned.
            del batch, output, rows, hidden, weight, logps


def score_reference(context: StepContext, model: Qwen3Model, reference: Qwen3Model | None,
                    samples: list[Sample]) -> None:
    """Reference log-probs: of the frozen starting model, or with LoRA of the model with its adapters off."""
    if reference is not None:
        score_samples(context, reference, samples, "ref_logps")
        return
    with adapters_disabled(model), tower_features_recomputed(model, samples):
        score_samples(context, model, samples, "ref_logps")


@contextmanager
def tower_features_recomputed(model: Qwen3Model, samples: list[Sample]):
    """With LoRA adapters in the vision tower, the prompts' stored image features are the adapted tower's; the
    reference (adapters off) computes its own, once per prompt and micro-batch: copies of the prompts'
    PromptVisions that name no tower (model.qwen3_vl.VisionLanguage.features_of)."""
    visual = getattr(model, "visual", None)
    if visual is None or not has_lora(visual):
        yield
        return
    originals = [sample.vision for sample in samples]
    copies = {}
    for sample in samples:
        if sample.vision is not None:
            sample.vision = copies.setdefault(id(sample.vision), dataclasses.replace(sample.vision, tower=0))
    try:
        yield
    finally:
        for sample, vision in zip(samples, originals):
            sample.vision = vision
