"""Rotary position embeddings with the scalings of released Qwen3 configs (linear, dynamic NTK, yarn).

The frequencies are recomputed on every forward from the arguments instead of being stored as a
buffer: it is a handful of [head_dim / 2] operations, it keeps them in fp32 whatever dtype the
model is cast to, and a model built on the meta device needs nothing re-initialised after loading.
"""

from __future__ import annotations

import math

import torch

from gspo_engine.model.args import ModelArgs


def inverse_frequencies(args: ModelArgs, seq_len: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """inv_freq [rotary_dim / 2] in fp32 and the factor cos / sin are multiplied by (yarn), as transformers computes them.

    rotary_dim is head_dim, or its leading part in models with partial rotary embeddings (Qwen3-Next).
    seq_len is max(position_ids) + 1; only "dynamic" depends on it.
    """
    dim = args.rotary_dim
    base = args.rope_theta
    scaling = args.rope_scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    if scaling is None:
        return 1.0 / (base**exponents), 1.0
    if scaling.rope_type == "linear":
        return 1.0 / (base**exponents) / scaling.factor, 1.0
    if scaling.rope_type == "dynamic":
        # NTK-aware: the base grows once the sequence outgrows max_position_embeddings. transformers
        # caches the grown frequencies across calls; computing them from each batch's length gives
        # the same values as a fresh transformers model on that batch.
        seq_len = max(seq_len, args.max_position_embeddings)
        ratio = scaling.factor * seq_len / args.max_position_embeddings - (scaling.factor - 1)
        base = base * ratio ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    return _yarn(args, device)


def _yarn(args: ModelArgs, device: torch.device) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, blend in between."""
    scaling = args.rope_scaling
    dim, base, factor = args.rotary_dim, args.rope_theta, scaling.factor
    original_max = scaling.original_max_position_embeddings
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast = scaling.beta_fast or 32
    beta_slow = scaling.beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp  # 1 where a dimension keeps its original frequency
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def rotary_cos_sin(
    args: ModelArgs, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rotary_dim] for position_ids [B, T] (or [1, T]), cast to the activations' dtype."""
    seq_len = 0
    if args.rope_scaling is not None and args.rope_scaling.rope_type == "dynamic":
        seq_len = int(position_ids.max()) + 1
    inv_freq, attention_factor = inverse_frequencies(args, seq_len, position_ids.device)
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim] rotated by cos / sin [B, T, head_dim] (rotate-half layout, as Qwen3 is trained)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
