"""Plain PyTorch versions of every kernel, written for clarity rather than speed.

These are the baselines that tests (in float64) and benchmarks compare against. They follow
the math of GSPO (Zheng et al., arXiv 2507.18071) term by term and lean on autograd for
gradients. Each mirrors the signature of the public function it is named after, on purpose, so
a test or a benchmark calls either the same way; unlike them, these do no validation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gspo_kernels.loss_stats import KL_LOG_RATIO_MAX, POLICY_LOG_RATIO_MAX


# Mirrors the signature of gspo_kernels.gspo_loss.
def gspo_loss_reference(
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
    """GSPO / GSPO-token / GRPO loss from per-token log-probs [B, T]; see gspo_kernels.gspo_loss."""
    response = mask.bool()
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    # Masked positions may hold inf or NaN: they are replaced before any arithmetic touches them.
    logps = torch.where(response, logps, zero)
    old_logps = torch.where(response, old_logps.to(logps.dtype), zero)
    lengths = response.sum(dim=1)
    valid = lengths > 0
    num_valid = valid.sum()
    safe_lengths = lengths.clamp(min=1).to(logps.dtype)

    token_log_ratio = logps - old_logps
    if advantages.dim() == 1:
        token_advantages = advantages[:, None].expand_as(logps)
    else:
        token_advantages = advantages
    token_advantages = torch.where(response, token_advantages.to(logps.dtype), zero)

    if level == "sequence":
        seq_log_ratio = token_log_ratio.sum(dim=1) / safe_lengths
        seq_ratio = torch.exp(seq_log_ratio.clamp(max=POLICY_LOG_RATIO_MAX))
        adv = advantages.to(logps.dtype)
        unclipped = seq_ratio * adv
        clipped = seq_ratio.clamp(1 - eps_low, 1 + eps_high) * adv
        per_seq_policy_loss = -torch.minimum(unclipped, clipped)
        token_ratio = seq_ratio[:, None].expand_as(logps)
        ratio_mean = (seq_ratio * valid).sum() / num_valid.clamp(min=1)
    else:
        if level == "sequence_token":
            seq_log_ratio = (token_log_ratio.sum(dim=1) / safe_lengths).detach()
            # s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]: the value of s_i, the gradient of one token.
            token_log = seq_log_ratio[:, None] + logps - logps.detach()
        elif level == "token":
            token_log = token_log_ratio
        else:
            raise ValueError(f"unknown level {level!r}")
        token_ratio = torch.exp(token_log.clamp(max=POLICY_LOG_RATIO_MAX))
        unclipped = token_ratio * token_advantages
        clipped = token_ratio.clamp(1 - eps_low, 1 + eps_high) * token_advantages
        per_token_loss = torch.where(response, -torch.minimum(unclipped, clipped), zero)
        per_seq_policy_loss = per_token_loss.sum(dim=1) / safe_lengths
        if level == "sequence_token":
            seq_ratio = torch.exp(seq_log_ratio.clamp(max=POLICY_LOG_RATIO_MAX))
            ratio_mean = (seq_ratio * valid).sum() / num_valid.clamp(min=1)
        else:
            ratio_mean = torch.where(response, token_ratio, zero).sum() / lengths.sum().clamp(min=1)

    per_seq_loss = per_seq_policy_loss
    num_tokens = lengths.sum().clamp(min=1).to(logps.dtype)
    if ref_logps is not None:
        ref_logps = torch.where(response, ref_logps.to(logps.dtype), zero)
        log_ref_ratio = (ref_logps - logps).clamp(max=KL_LOG_RATIO_MAX)
        token_kl = torch.where(response, torch.exp(log_ref_ratio) - log_ref_ratio - 1, zero)
        # token_ratio carries the level's gradient: s_i's for "sequence", the token's own otherwise.
        loss_kl = token_kl * token_ratio if kl_weighted_by_ratio else token_kl
        per_seq_loss = per_seq_loss + beta * loss_kl.sum(dim=1) / safe_lengths
        kl = token_kl.detach().sum() / num_tokens
    else:
        kl = zero.detach().clone()

    num_averaged = torch.tensor(logps.shape[0]) if count_empty_sequences else num_valid
    loss = torch.where(valid, per_seq_loss, zero).sum() / num_averaged.clamp(min=1)

    with torch.no_grad():
        token_adv_detached = token_advantages.detach()
        ratio = token_ratio.detach()
        clipped_low = response & (token_adv_detached < 0) & (ratio < 1 - eps_low)
        clipped_high = response & (token_adv_detached > 0) & (ratio > 1 + eps_high)
        low = clipped_low.sum() / num_tokens
        high = clipped_high.sum() / num_tokens
        metrics = {
            "clip_frac": (low + high).to(logps.dtype),
            "clip_frac_low": low.to(logps.dtype),
            "clip_frac_high": high.to(logps.dtype),
            "ratio_mean": ratio_mean.detach(),
            "kl": kl,
        }
    return loss, metrics


# Mirrors the signature of gspo_kernels.token_logprobs.
def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Log-prob of each target token [B, T] by materializing logits [B, T, V], as TRL does."""
    logits = F.linear(hidden, weight, bias) / temperature
    log_probs = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logps
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logps, entropy


# Mirrors the signature of gspo_kernels.fused_linear_gspo_loss (its loss options are gspo_loss_reference's).
def fused_linear_gspo_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    level: str = "sequence",
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_weighted_by_ratio: bool = False,
    count_empty_sequences: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lm_head -> full logits -> log_softmax -> gather -> GSPO loss."""
    logps = token_logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature)
    return gspo_loss_reference(
        logps, old_logps, advantages, mask, level=level, eps_low=eps_low, eps_high=eps_high,
        ref_logps=ref_logps, beta=beta, kl_weighted_by_ratio=kl_weighted_by_ratio,
        count_empty_sequences=count_empty_sequences,
    )


# Mirrors the signature of gspo_kernels.moe_route, without routing replay.
def moe_route_reference(
    router_logits: torch.Tensor, top_k: int, *, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE routing: softmax in fp32 over E experts, top-k, optional renormalisation."""
    probs = torch.softmax(router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)), dim=-1)
    topk_weights, topk_idx = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_idx


# Mirrors the signature of gspo_kernels.moe_experts.
def moe_experts_reference(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """One SwiGLU expert at a time, as transformers' eager Qwen3-MoE block computes it.

    x [N, H], topk_idx / topk_weights [N, k], w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I].
    """
    out = torch.zeros_like(x)
    intermediate = w_down.shape[2]
    for expert in range(w_gate_up.shape[0]):
        token, slot = torch.where(topk_idx == expert)
        if token.numel() == 0:
            continue
        gate_up = x[token] @ w_gate_up[expert].t()
        gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
        expert_out = (F.silu(gate) * up) @ w_down[expert].t()
        out = out.index_add(0, token, expert_out * topk_weights[token, slot, None].to(x.dtype))
    return out
