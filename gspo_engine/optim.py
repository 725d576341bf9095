"""AdamW and the learning-rate schedule (linear warmup, then constant or cosine)."""

from __future__ import annotations

import math

import torch

from gspo_engine.config import OptimConfig


def fused_on(params: list[torch.Tensor]) -> bool:
    """Whether AdamW runs fused: on CUDA, one kernel per group of tensors updates weights and both moments in a
    single pass, where the foreach default makes about ten passes over every state (at Qwen3-30B-A3B widths on
    an H200 the foreach step was 30% of an update step, bench/RESULTS.md). The default of transformers' Trainer
    (and so TRL's) on torch >= 2.8 too."""
    return bool(params) and all(p.device.type == "cuda" for p in params)


def build_optimizer(parameters, config: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(
        params, lr=config.learning_rate, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
        fused=fused_on(params) or None,
    )


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
