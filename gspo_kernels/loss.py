"""The GSPO loss from per-token log-probs: public function, validation, autograd, CPU path.

Per sequence i with response tokens t (mask = 1), n_i of them, advantage A_i:

    s_i   = exp( (1/n_i) * sum_t (logp_it - old_logp_it) )            (GSPO eq. 7)
    loss  = mean over sequences with n_i > 0 of
            -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)   (eq. 5)
            + beta * (1/n_i) * sum_t k3(ref_it, logp_it)

Two conventions of TRL's GRPOTrainer are options: `kl_weighted_by_ratio` multiplies each
token's k3 by the level's importance ratio (s_i, with its gradient), and `count_empty_sequences`
divides by all B sequences instead of those with n_i > 0.

"sequence_token" (GSPO-token, eqs. 13-17) and "token" (GRPO) apply the clipped term per token
and average it over the sequence's tokens. The algorithm runs in two steps, identical in the
Triton kernels (gspo_kernels/loss_triton.py) and in the PyTorch path below:

1. forward: one pass per sequence writes a row of per-sequence statistics
   (`gspo_kernels.loss_stats.Stat`); the loss and the metrics are sums over those rows;
2. backward: every token's gradient follows from its own inputs and its sequence's row.

Overflow guard: every log-ratio is clamped from above before exp (at 10 for importance
ratios, at 20 inside the KL). A clamped term keeps its finite value and passes no gradient,
at every level, as autograd through `clamp` would.
"""

from __future__ import annotations

import math

import torch

from gspo_kernels import reference
from gspo_kernels.backend import resolve_backend
from gspo_kernels.loss_stats import KL_LOG_RATIO_MAX, LEVELS, NUM_STATS, POLICY_LOG_RATIO_MAX, Stat
from gspo_kernels.validation import describe, require_tensor


def validate_loss_inputs(logps, old_logps, advantages, mask, level, eps_low, eps_high, ref_logps, beta,
                         kl_weighted_by_ratio, count_empty_sequences) -> None:
    """Raise ValueError naming the argument for every input gspo_loss cannot take."""
    named = {"logps": logps, "old_logps": old_logps, "advantages": advantages, "mask": mask}
    if ref_logps is not None:
        named["ref_logps"] = ref_logps
    for name, value in named.items():
        require_tensor(name, value)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}; got {level!r}")
    if logps.dim() != 2:
        raise ValueError(f"logps must be [B, T]; got {describe('logps', logps)}")
    for name in ("logps", "old_logps", "advantages") + (("ref_logps",) if ref_logps is not None else ()):
        if not named[name].is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {describe(name, named[name])}")
    for name in ("old_logps", "mask") + (("ref_logps",) if ref_logps is not None else ()):
        if named[name].shape != logps.shape:
            raise ValueError(
                f"{name} must have the shape of logps; got {describe(name, named[name])} and {describe('logps', logps)}"
            )
    if mask.is_complex():
        raise ValueError(f"mask must be bool or 0/1; got {describe('mask', mask)}")
    batch = logps.shape[0]
    if advantages.shape == (batch,):
        pass
    elif advantages.shape == logps.shape:
        if level == "sequence":
            raise ValueError(
                f"level 'sequence' takes one advantage per sequence [B] = [{batch}]; got "
                f"{describe('advantages', advantages)} (use level 'sequence_token' for per-token advantages)"
            )
    else:
        raise ValueError(
            f"advantages must be [B] or [B, T]; got {describe('advantages', advantages)} with {describe('logps', logps)}"
        )
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high), ("beta", beta)):
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{name} must be a finite number >= 0; got {eps!r}")
    flags = {"kl_weighted_by_ratio": kl_weighted_by_ratio, "count_empty_sequences": count_empty_sequences}
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False; got {flag!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"beta = {beta} needs ref_logps (the reference policy's per-token log-probs)")
    for name, value in named.items():
        if value.device != logps.device:
            raise ValueError(f"{name} is on {value.device} but logps is on {logps.device}")


def _compute_dtype(logps: torch.Tensor) -> torch.dtype:
    return torch.float64 if logps.dtype == torch.float64 else torch.float32


def _clip_counts(response, token_advantages, ratio, eps_low, eps_high):
    low = response & (token_advantages < 0) & (ratio < 1 - eps_low)
    high = response & (token_advantages > 0) & (ratio > 1 + eps_high)
    return low, high


def torch_forward_stats(logps, old_logps, advantages, mask, ref_logps, level, eps_low, eps_high, beta,
                        kl_weighted_by_ratio):
    """Per-sequence statistics [B, NUM_STATS], the PyTorch twin of the Triton forward kernel."""
    dtype = _compute_dtype(logps)
    response = mask != 0
    zero = torch.zeros((), dtype=dtype, device=logps.device)
    logps = torch.where(response, logps.to(dtype), zero)
    old_logps = torch.where(response, old_logps.to(dtype), zero)
    lengths = response.sum(dim=1).to(dtype)
    inv_lengths = 1.0 / lengths.clamp(min=1)
    token_log_ratio = logps - old_logps
    seq_log_ratio = token_log_ratio.sum(dim=1) * inv_lengths
    seq_ratio = torch.exp(seq_log_ratio.clamp(max=POLICY_LOG_RATIO_MAX))
    stats = torch.zeros(logps.shape[0], NUM_STATS, dtype=dtype, device=logps.device)

    if advantages.dim() == 1 and level != "token":
        # One advantage per sequence: every token of the sequence has the same clipped term.
        adv = advantages.to(dtype)
        policy = -torch.minimum(seq_ratio * adv, seq_ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
        stats[:, Stat.CLIP_LOW] = torch.where((adv < 0) & (seq_ratio < 1 - eps_low), lengths, zero)
        stats[:, Stat.CLIP_HIGH] = torch.where((adv > 0) & (seq_ratio > 1 + eps_high), lengths, zero)
        stats[:, Stat.RATIO_SUM] = torch.where(lengths > 0, seq_ratio, zero)
    else:
        token_adv = advantages.to(dtype)
        if token_adv.dim() == 1:
            token_adv = token_adv[:, None].expand_as(logps)
        token_adv = torch.where(response, token_adv, zero)
        if level == "token":
            ratio = torch.exp(token_log_ratio.clamp(max=POLICY_LOG_RATIO_MAX))
            stats[:, Stat.RATIO_SUM] = torch.where(response, ratio, zero).sum(dim=1)
        else:
            ratio = seq_ratio[:, None].expand_as(logps)
            stats[:, Stat.RATIO_SUM] = torch.where(lengths > 0, seq_ratio, zero)
        token_loss = -torch.minimum(ratio * token_adv, ratio.clamp(1 - eps_low, 1 + eps_high) * token_adv)
        policy = torch.where(response, token_loss, zero).sum(dim=1) * inv_lengths
        low, high = _clip_counts(response, token_adv, ratio, eps_low, eps_high)
        stats[:, Stat.CLIP_LOW] = low.sum(dim=1).to(dtype)
        stats[:, Stat.CLIP_HIGH] = high.sum(dim=1).to(dtype)

    if ref_logps is not None:
        log_ref_ratio = (torch.where(response, ref_logps.to(dtype), zero) - logps).clamp(max=KL_LOG_RATIO_MAX)
        token_kl = torch.where(response, torch.exp(log_ref_ratio) - log_ref_ratio - 1, zero)
        stats[:, Stat.KL_SUM] = token_kl.sum(dim=1)
        kl_term = stats[:, Stat.KL_SUM]
        if kl_weighted_by_ratio:
            kl_term = (token_kl * ratio).sum(dim=1) if level == "token" else kl_term * seq_ratio
        policy = policy + beta * kl_term * inv_lengths

    stats[:, Stat.LOSS] = torch.where(lengths > 0, policy, zero)
    stats[:, Stat.LENGTH] = lengths
    stats[:, Stat.SEQ_LOG_RATIO] = seq_log_ratio
    return stats


def torch_backward_grad(logps, old_logps, advantages, mask, ref_logps, stats, level, eps_low, eps_high, beta,
                        kl_weighted_by_ratio, grad_loss, num_averaged):
    """d loss / d logps [B, T], the PyTorch twin of the Triton backward kernel.

    `grad_loss` is d(total) / d(loss) and `num_averaged` the number of sequences the loss averages
    over (0-dim tensors: neither is read back to the host).
    """
    dtype = stats.dtype
    scale = grad_loss.to(dtype) / num_averaged.clamp(min=1)
    response = mask != 0
    zero = torch.zeros((), dtype=dtype, device=logps.device)
    inv_lengths = 1.0 / stats[:, Stat.LENGTH].clamp(min=1)
    token_adv = advantages.to(dtype)
    if token_adv.dim() == 1:
        token_adv = token_adv[:, None]
    if level == "token":
        log_ratio = torch.where(response, logps.to(dtype), zero) - torch.where(response, old_logps.to(dtype), zero)
    else:
        log_ratio = stats[:, Stat.SEQ_LOG_RATIO, None]
    ratio = torch.exp(log_ratio.clamp(max=POLICY_LOG_RATIO_MAX))
    clipped = ((token_adv > 0) & (ratio > 1 + eps_high)) | ((token_adv < 0) & (ratio < 1 - eps_low))
    passes = ~clipped & (log_ratio <= POLICY_LOG_RATIO_MAX)
    coefficient = torch.where(passes, -token_adv * ratio, zero)
    if ref_logps is not None and beta != 0:
        log_ref_ratio = torch.where(response, ref_logps.to(dtype), zero) - torch.where(response, logps.to(dtype), zero)
        clamped_ref_ratio = log_ref_ratio.clamp(max=KL_LOG_RATIO_MAX)
        kl_coefficient = torch.where(log_ref_ratio <= KL_LOG_RATIO_MAX, 1 - torch.exp(clamped_ref_ratio), zero)
        if kl_weighted_by_ratio:
            # d(ratio * kl) = ratio * d kl + kl * d ratio. Through s_i every token of the sequence
            # receives the sequence's mean KL; through a token's own ratio, that token's KL.
            if level == "sequence":
                kl_through_ratio = (stats[:, Stat.KL_SUM] * inv_lengths)[:, None]
            else:
                kl_through_ratio = torch.exp(clamped_ref_ratio) - clamped_ref_ratio - 1
            passes_ratio = log_ratio <= POLICY_LOG_RATIO_MAX
            kl_coefficient = ratio * (kl_coefficient + torch.where(passes_ratio, kl_through_ratio, zero))
        coefficient = coefficient + beta * kl_coefficient
    grad = torch.where(response, coefficient * (inv_lengths[:, None] * scale.to(dtype)), zero)
    return grad.to(logps.dtype)


def torch_reduce_stats(stats, level, count_empty_sequences):
    """(loss, metrics [5] in METRIC_NAMES order, number of sequences averaged over) from the statistics
    rows, the PyTorch twin of the Triton reduction kernel."""
    totals = stats.sum(dim=0)
    num_valid = (stats[:, Stat.LENGTH] > 0).sum().to(stats.dtype)
    num_averaged = torch.full_like(num_valid, stats.shape[0]) if count_empty_sequences else num_valid
    num_tokens = totals[Stat.LENGTH].clamp(min=1)
    loss = totals[Stat.LOSS] / num_averaged.clamp(min=1)
    clip_low = totals[Stat.CLIP_LOW] / num_tokens
    clip_high = totals[Stat.CLIP_HIGH] / num_tokens
    ratio_denominator = num_tokens if level == "token" else num_valid.clamp(min=1)
    metrics = torch.stack([clip_low + clip_high, clip_low, clip_high, totals[Stat.RATIO_SUM] / ratio_denominator,
                           totals[Stat.KL_SUM] / num_tokens])
    return loss, metrics, num_averaged


class TorchLossKernels:
    forward_stats = staticmethod(torch_forward_stats)
    reduce_stats = staticmethod(torch_reduce_stats)
    backward_grad = staticmethod(torch_backward_grad)


def _kernels_for(backend: str, logps: torch.Tensor):
    if backend == "triton" and logps.numel() > 0 and logps.dtype != torch.float64:
        from gspo_kernels import loss_triton

        return loss_triton
    return TorchLossKernels


class GSPOLossFunction(torch.autograd.Function):
    """Loss and metrics from per-sequence statistics; gradient with respect to logps only."""

    @staticmethod
    def forward(ctx, logps, old_logps, advantages, mask, ref_logps, level, eps_low, eps_high, beta,
                kl_weighted_by_ratio, count_empty_sequences, kernels):
        stats = kernels.forward_stats(
            logps, old_logps, advantages, mask, ref_logps, level, eps_low, eps_high, beta, kl_weighted_by_ratio
        )
        loss, metrics, num_averaged = kernels.reduce_stats(stats, level, count_empty_sequences)
        metrics = metrics.unbind()
        ctx.save_for_backward(logps, old_logps, advantages, mask, ref_logps, stats, num_averaged)
        ctx.config = (level, eps_low, eps_high, beta, kl_weighted_by_ratio, kernels)
        ctx.mark_non_differentiable(*metrics)
        # The metrics never receive gradients: without this autograd would fill five zero tensors for
        # them before every backward (five allocations and five kernel launches on a GPU).
        ctx.set_materialize_grads(False)
        return (loss, *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        logps, old_logps, advantages, mask, ref_logps, stats, num_averaged = ctx.saved_tensors
        level, eps_low, eps_high, beta, kl_weighted_by_ratio, kernels = ctx.config
        if grad_loss is None:
            return (None,) * 12
        grad = kernels.backward_grad(
            logps, old_logps, advantages, mask, ref_logps, stats, level, eps_low, eps_high, beta,
            kl_weighted_by_ratio, grad_loss, num_averaged,
        )
        return (grad,) + (None,) * 11


METRIC_NAMES = ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "kl")


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "sequence",
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_weighted_by_ratio: bool = False,
    count_empty_sequences: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO loss (arXiv 2507.18071) from per-token log-probs.

    Args:
        logps: [B, T] fp32 / bf16 log-probs of the sampled tokens under the current policy
            (differentiable).
        old_logps: [B, T] the same tokens under the old (rollout) policy; never differentiated.
        advantages: [B], one per sequence, or [B, T] per token (levels "sequence_token", "token").
        mask: [B, T] bool or 0/1, 1 on response tokens. Masked values never reach the result.
        level: "sequence" (GSPO), "sequence_token" (GSPO-token) or "token" (GRPO).
        eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high].
        ref_logps: [B, T] optional reference-policy log-probs for the k3 KL.
        beta: weight of the per-sequence token-mean KL in the loss.
        kl_weighted_by_ratio: multiply each token's KL in the loss by the importance ratio of
            `level` (s_i for the sequence levels, the token's ratio for "token"), gradient
            included, as TRL's `use_bias_correction_kl=True` does. The `kl` metric stays
            unweighted.
        count_empty_sequences: average over all B sequences, those without response tokens
            adding 0, as TRL's `loss_type="grpo"` does; by default only sequences with at
            least one response token count.

    Returns:
        loss: 0-dim fp32 (fp64 for fp64 inputs) mean over sequences with at least one response
            token (over all B with count_empty_sequences); 0 with zero gradient when there are
            none.
        metrics: detached 0-dim tensors clip_frac, clip_frac_low, clip_frac_high (fractions of
            response tokens), ratio_mean (sequence ratio over valid sequences; token ratio over
            response tokens for "token"), kl (mean per-token k3 KL, 0 without ref_logps).
    """
    validate_loss_inputs(logps, old_logps, advantages, mask, level, eps_low, eps_high, ref_logps, beta,
                         kl_weighted_by_ratio, count_empty_sequences)
    backend = resolve_backend(logps)
    if backend == "reference":
        return reference.gspo_loss_reference(
            logps, old_logps, advantages, mask, level=level, eps_low=eps_low, eps_high=eps_high,
            ref_logps=ref_logps, beta=beta, kl_weighted_by_ratio=kl_weighted_by_ratio,
            count_empty_sequences=count_empty_sequences,
        )
    kernels = _kernels_for(backend, logps)
    loss, *metric_values = GSPOLossFunction.apply(
        logps, old_logps.detach(), advantages.detach(), mask, None if ref_logps is None else ref_logps.detach(),
        level, float(eps_low), float(eps_high), float(beta), kl_weighted_by_ratio, count_empty_sequences, kernels,
    )
    return loss, dict(zip(METRIC_NAMES, metric_values))
