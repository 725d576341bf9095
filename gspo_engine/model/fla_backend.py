"""The CUDA path of the Gated DeltaNet layers: flash-linear-attention (`fla-core`, the `next` extra).

Only what the layers call, translated to flash-linear-attention's conventions: its chunked gated
delta rule (forward and backward Triton kernels, variable-length rows through cu_seqlens) and its
short causal convolution. Checked against fla-core 0.6.0.
"""

from __future__ import annotations

import importlib

import torch

INSTALL_HINT = "pip install 'gspo-engine[next]' (flash-linear-attention, the fla-core package)"


class MissingFlashLinearAttention(ImportError):
    """Qwen3-Next / Qwen3.5 layers met a CUDA tensor without flash-linear-attention installed."""


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingFlashLinearAttention(
            f"Gated DeltaNet layers (Qwen3-Next, Qwen3.5) on CUDA run flash-linear-attention's kernels: {INSTALL_HINT}"
        ) from error


def require() -> None:
    """Raise MissingFlashLinearAttention unless flash-linear-attention can be imported (before a model is loaded onto CUDA)."""
    _import("fla.ops.gated_delta_rule")
    _import("fla.modules.causal_conv1d")


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla.ops.gated_delta_rule.chunk_gated_delta_rule: same shapes as ours ([B, T, H, K], states [N, HV, K, V])."""
    ops = _import("fla.ops.gated_delta_rule")
    out, state = ops.chunk_gated_delta_rule(
        q, k, v, g.float(), beta, scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=qk_l2norm,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.long),
    )
    return out, state


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, activation: str | None, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """fla.modules.causal_conv1d: x [B, T, D], weight [D, W]; each sequence of cu_seqlens starts from zeros."""
    conv = _import("fla.modules.causal_conv1d")
    # Under autocast x arrives in its dtype while the weight is the fp32 master copy: autocast does not
    # reach a custom kernel, so the cast it would make for a convolution is made here.
    y, _ = conv.causal_conv1d(
        x, weight=weight.to(x.dtype), activation=activation,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.long),
    )
    return y
