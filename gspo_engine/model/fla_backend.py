"""The CUDA path of the Gated DeltaNet layers: flash-linear-attention (`fla-core`, the `next` extra).

Only what the layers call, translated to flash-linear-attention's conventions: its chunked gated
delta rule (forward and backward Triton kernels, variable-length rows through cu_seqlens) and its
short causal convolution. Checked against fla-core 0.6.0.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

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


@functools.cache
def gated_backward_refusal() -> str | None:
    """Why flash-linear-attention will refuse the gated delta rule's backward on this machine, or None.

    fla-core 0.6 raises in the backward (fla issue #640) on Hopper GPUs with Triton >= 3.4.0 and
    < 3.7.1, where Triton compiles one of its backward kernels into wrong results, unless tilelang
    is installed (fla then runs that kernel from tilelang). The check reads fla's own flags, so it
    agrees with the condition fla tests; a version of fla without them is taken not to refuse.
    """
    try:
        flags = importlib.import_module("fla.utils")
    except ImportError:
        return None
    hopper = getattr(flags, "IS_NVIDIA_HOPPER", False)
    affected = getattr(flags, "TRITON_ABOVE_3_4_0", False) and not getattr(flags, "TRITON_ABOVE_3_7_1", True)
    if not (hopper and affected) or importlib.util.find_spec("tilelang") is not None:
        return None
    import triton

    return (f"flash-linear-attention refuses the Gated DeltaNet backward on Hopper GPUs with Triton "
            f"{triton.__version__} (>= 3.4.0 and < 3.7.1 miscompile one of its kernels, fla issue #640)")


def use_for(needs_grad: bool) -> bool:
    """Whether a CUDA call of the gated delta rule runs fla's kernels: always without gradients, and with
    them unless fla would refuse their backward (then our PyTorch chunked rule runs, with one warning)."""
    refusal = gated_backward_refusal() if needs_grad else None
    if refusal is not None:
        _warn_once(refusal)
    return refusal is None


@functools.cache
def _warn_once(refusal: str) -> None:
    warnings.warn(
        f"{refusal}: the layers' training forward and backward run gspo-engine's PyTorch chunked rule instead "
        "(same results, slower); rollouts and scoring keep fla's kernels. Install tilelang (pip install tilelang) "
        "or Triton >= 3.7.1 for fla's backward.",
        stacklevel=3,
    )


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
