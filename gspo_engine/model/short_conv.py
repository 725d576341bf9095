"""The short causal depthwise convolution in front of the gated delta rule, with its decode state.

y_t = act(sum_w weight[:, w] * x_{t - (W - 1) + w}): each channel sees its last W inputs (W = 4 in
Qwen3-Next and Qwen3.5), inputs before a sequence's start being zeros, or the W - 1 inputs of the
state a decode step carries. State layout [B, D, W - 1], oldest input first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gspo_engine.model.fla_backend import causal_conv1d as fla_causal_conv1d

ACTIVATIONS = {"silu": F.silu, None: lambda x: x}


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, T, D], weight [D, W] -> y [B, T, D] in x's dtype, and the final state [N, D, W - 1].

    initial_state [B, D, W - 1] continues rows from earlier inputs (not with cu_seqlens). With
    cu_seqlens (int [N + 1], B == 1) the row holds N sequences, each starting from zeros; the final
    states are then one per sequence. On CUDA, without an initial state, flash-linear-attention's
    kernel computes y (backend "fla" or "torch" forces one).
    """
    batch, seq, channels = _check(x, weight, activation, initial_state, cu_seqlens)
    width = weight.shape[1]
    backend = backend or ("fla" if x.is_cuda and initial_state is None else "torch")
    if backend == "fla":
        if initial_state is not None:
            raise ValueError("the fla backend runs without an initial_state; decode steps take backend 'torch'")
        y = fla_causal_conv1d(x, weight, activation, cu_seqlens)
    elif backend != "torch":
        raise ValueError(f"backend must be 'fla' or 'torch', got {backend!r}")
    elif cu_seqlens is None:
        history = (
            x.new_zeros(batch, width - 1, channels) if initial_state is None else initial_state.transpose(1, 2).to(x.dtype)
        )
        extended = torch.cat((history, x), dim=1).transpose(1, 2)
        y = F.conv1d(extended.to(weight.dtype), weight[:, None, :], groups=channels).transpose(1, 2)
        y = ACTIVATIONS[activation](y).to(x.dtype)
    else:
        y = ACTIVATIONS[activation](_packed_conv(x, weight, _positions(cu_seqlens, seq))).to(x.dtype)
    if not output_final_state:
        return y, None
    return y, _final_state(x, width, initial_state, cu_seqlens)


def _check(x, weight, activation, initial_state, cu_seqlens) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got {tuple(x.shape)}")
    batch, seq, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must be [D, W] with D = {channels}, got {tuple(weight.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if initial_state is not None:
        expected = (batch, channels, weight.shape[1] - 1)
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [B, D, W - 1] = {expected}, got {tuple(initial_state.shape)}")
        if cu_seqlens is not None:
            raise ValueError("initial_state and cu_seqlens together are not supported: packed rows start from zeros")
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed in one row (B == 1), got B = {batch}")
    return batch, seq, channels


def _positions(cu_seqlens: torch.Tensor, seq: int) -> torch.Tensor:
    """[T]: each token's position inside its sequence."""
    bounds = cu_seqlens.to(torch.long)
    lengths = bounds[1:] - bounds[:-1]
    if int(bounds[0]) != 0 or int(bounds[-1]) != seq or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {seq}, got {bounds.tolist()}")
    starts = torch.repeat_interleave(bounds[:-1], lengths, output_size=seq)
    return torch.arange(seq, device=cu_seqlens.device) - starts


def _packed_conv(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The convolution of a packed row as W shifted copies, each masked where it would cross a sequence start."""
    width = weight.shape[1]
    x = x.to(weight.dtype)
    y = x * weight[:, width - 1]
    for shift in range(1, width):
        shifted = F.pad(x, (0, 0, shift, 0))[:, : x.shape[1]]
        y = y + shifted * (positions >= shift)[None, :, None].to(x.dtype) * weight[:, width - 1 - shift]
    return y


def _final_state(x, width: int, initial_state, cu_seqlens) -> torch.Tensor:
    """The last W - 1 inputs of every row (or sequence), zeros (or the initial state) where there are fewer."""
    if cu_seqlens is None:
        history = (
            x.new_zeros(x.shape[0], width - 1, x.shape[2]) if initial_state is None
            else initial_state.transpose(1, 2).to(x.dtype)
        )
        return torch.cat((history, x), dim=1)[:, -(width - 1):].transpose(1, 2).contiguous()
    bounds = cu_seqlens.to(torch.long)
    offsets = torch.arange(-(width - 1), 0, device=x.device)
    index = bounds[1:, None] + offsets[None, :]  # [N, W - 1] positions in the row
    valid = index >= bounds[:-1, None]
    gathered = x[0][index.clamp(min=0)] * valid[..., None].to(x.dtype)  # [N, W - 1, D]
    return gathered.transpose(1, 2).contiguous()
