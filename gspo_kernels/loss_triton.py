"""Triton kernels of the GSPO loss: two forward kernels, one backward kernel.

forward: one program per sequence streams its T tokens in tiles, reduces the masked log-ratio
(and, per level, the per-token clipped terms and the KL), then writes one row of per-sequence
statistics (the columns of `gspo_kernels.loss_stats.Stat`). One more program sums those rows into
the loss, the metrics and the number of sequences averaged over, in a fixed order (deterministic,
no atomics): at training sizes the loss is a few microseconds of GPU work, so each launch saved
from the dozen small PyTorch reductions it replaces is time saved. Per-token advantages at the sequence levels need
s_i before the per-token terms, so those rows read their tokens twice; every other case reads
them once. With KL_WEIGHTED the KL of each token is multiplied by the importance ratio of the
level (s_i, or the token's own ratio for "token") in the loss; the KL_SUM column stays unweighted.

backward: one program per (sequence, tile of tokens) writes d loss / d logps for its tokens
in a single pass from the tokens' inputs and the sequence's statistics row.

Inputs of any float dtype are read as they are and accumulated in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gspo_kernels.loss_stats import KL_LOG_RATIO_MAX, NUM_STATS, POLICY_LOG_RATIO_MAX

LEVEL_CODES = {"sequence": 0, "sequence_token": 1, "token": 2}
# BLOCK_T of a kernel: the power of two that holds a row's T tokens, from MIN_BLOCK_T up to its largest.
MIN_BLOCK_T = 16
# 512: at 1024 the forward kernel's eight accumulators take 64 registers a thread, and ptxas for
# sm_100 spilled one of them (fp16, "token" level with a KL term).
FORWARD_BLOCK_T = 512
BACKWARD_BLOCK_T = 1024
# rows of statistics the reduction kernel sums at a time
REDUCE_BLOCK_B = 256

# Output allocator (a shape tuple, dtype, device); tests swap in one that poisons outputs with NaN to prove every element is written.
allocate_output = torch.empty


@triton.jit
def _clipped_term(ratio, adv, eps_low, eps_high):
    """-min(ratio * adv, clip(ratio) * adv) and whether the clipped side was taken (low, high)."""
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    term = -tl.minimum(ratio * adv, clipped_ratio * adv)
    is_low = (adv < 0) & (ratio < 1.0 - eps_low)
    is_high = (adv > 0) & (ratio > 1.0 + eps_high)
    return term, is_low, is_high


@triton.jit
def _gspo_forward_kernel(
    logps_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, stats_ptr,
    T, stride_logps, stride_old, stride_adv, stride_mask, stride_ref,
    eps_low, eps_high, beta,
    LEVEL: tl.constexpr, TOKEN_ADV: tl.constexpr, HAS_REF: tl.constexpr, KL_WEIGHTED: tl.constexpr,
    POLICY_MAX: tl.constexpr, KL_MAX: tl.constexpr, NUM_STATS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_T)
    log_ratio_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    length_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    weighted_kl_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    token_loss_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    ratio_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    low_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    high_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    seq_adv = 0.0
    if not TOKEN_ADV:
        seq_adv = tl.load(adv_ptr + row).to(tl.float32)

    for start in range(0, T, BLOCK_T):
        cols = start + offsets
        in_row = cols < T
        response = tl.load(mask_ptr + row * stride_mask + cols, mask=in_row, other=0) != 0
        # Masked positions may hold inf or NaN: select zeros before any arithmetic.
        logp = tl.where(response, tl.load(logps_ptr + row * stride_logps + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
        old = tl.where(response, tl.load(old_ptr + row * stride_old + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
        log_ratio = logp - old
        log_ratio_acc += log_ratio
        length_acc += response.to(tl.float32)
        if HAS_REF:
            ref = tl.where(response, tl.load(ref_ptr + row * stride_ref + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
            log_ref_ratio = tl.minimum(ref - logp, KL_MAX)
            token_kl = tl.where(response, tl.exp(log_ref_ratio) - log_ref_ratio - 1.0, 0.0)
            kl_acc += token_kl
            if KL_WEIGHTED:
                if LEVEL == 2:
                    weighted_kl_acc += token_kl * tl.exp(tl.minimum(log_ratio, POLICY_MAX))
        if LEVEL == 2:
            if TOKEN_ADV:
                adv = tl.where(response, tl.load(adv_ptr + row * stride_adv + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
            else:
                adv = tl.where(response, seq_adv, 0.0)
            ratio = tl.exp(tl.minimum(log_ratio, POLICY_MAX))
            term, is_low, is_high = _clipped_term(ratio, adv, eps_low, eps_high)
            token_loss_acc += tl.where(response, term, 0.0)
            ratio_acc += tl.where(response, ratio, 0.0)
            low_acc += (response & is_low).to(tl.float32)
            high_acc += (response & is_high).to(tl.float32)

    length = tl.sum(length_acc, axis=0)
    inv_length = 1.0 / tl.maximum(length, 1.0)
    seq_log_ratio = tl.sum(log_ratio_acc, axis=0) * inv_length
    seq_ratio = tl.exp(tl.minimum(seq_log_ratio, POLICY_MAX))
    if LEVEL == 2:
        policy = tl.sum(token_loss_acc, axis=0) * inv_length
        ratio_sum = tl.sum(ratio_acc, axis=0)
        clip_low = tl.sum(low_acc, axis=0)
        clip_high = tl.sum(high_acc, axis=0)
    elif TOKEN_ADV:
        # GSPO-token with per-token advantages: a second pass once s_i is known.
        token_ratio = tl.zeros([BLOCK_T], dtype=tl.float32) + seq_ratio
        for start in range(0, T, BLOCK_T):
            cols = start + offsets
            in_row = cols < T
            response = tl.load(mask_ptr + row * stride_mask + cols, mask=in_row, other=0) != 0
            adv = tl.where(response, tl.load(adv_ptr + row * stride_adv + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
            term, is_low, is_high = _clipped_term(token_ratio, adv, eps_low, eps_high)
            token_loss_acc += tl.where(response, term, 0.0)
            low_acc += (response & is_low).to(tl.float32)
            high_acc += (response & is_high).to(tl.float32)
        policy = tl.sum(token_loss_acc, axis=0) * inv_length
        ratio_sum = tl.where(length > 0, seq_ratio, 0.0)
        clip_low = tl.sum(low_acc, axis=0)
        clip_high = tl.sum(high_acc, axis=0)
    else:
        policy, is_low, is_high = _clipped_term(seq_ratio, seq_adv, eps_low, eps_high)
        ratio_sum = tl.where(length > 0, seq_ratio, 0.0)
        clip_low = tl.where(is_low, length, 0.0)
        clip_high = tl.where(is_high, length, 0.0)

    kl_sum = tl.sum(kl_acc, axis=0)
    kl_term = kl_sum
    if KL_WEIGHTED:
        if LEVEL == 2:
            kl_term = tl.sum(weighted_kl_acc, axis=0)
        else:
            kl_term = kl_sum * seq_ratio
    loss = tl.where(length > 0, policy + beta * kl_term * inv_length, 0.0)
    out = stats_ptr + row * NUM_STATS
    tl.store(out + 0, loss)
    tl.store(out + 1, length)
    tl.store(out + 2, seq_log_ratio)
    tl.store(out + 3, ratio_sum)
    tl.store(out + 4, clip_low)
    tl.store(out + 5, clip_high)
    tl.store(out + 6, kl_sum)


@triton.jit
def _gspo_reduce_kernel(
    stats_ptr, loss_ptr, metrics_ptr, num_averaged_ptr, B,
    LEVEL: tl.constexpr, COUNT_EMPTY: tl.constexpr, NUM_STATS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program: loss, metrics (clip_frac, clip_frac_low, clip_frac_high, ratio_mean, kl) and the
    number of sequences averaged over, from the [B, NUM_STATS] statistics rows."""
    offsets = tl.arange(0, BLOCK_B)
    loss_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    length_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    ratio_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    low_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    high_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    valid_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = (start + offsets).to(tl.int64)
        in_batch = rows < B
        row_ptr = stats_ptr + rows * NUM_STATS
        length = tl.load(row_ptr + 1, mask=in_batch, other=0.0)
        loss_acc += tl.load(row_ptr + 0, mask=in_batch, other=0.0)
        length_acc += length
        ratio_acc += tl.load(row_ptr + 3, mask=in_batch, other=0.0)
        low_acc += tl.load(row_ptr + 4, mask=in_batch, other=0.0)
        high_acc += tl.load(row_ptr + 5, mask=in_batch, other=0.0)
        kl_acc += tl.load(row_ptr + 6, mask=in_batch, other=0.0)
        valid_acc += (length > 0).to(tl.float32)
    num_valid = tl.sum(valid_acc, axis=0)
    num_tokens = tl.maximum(tl.sum(length_acc, axis=0), 1.0)
    num_averaged = num_valid
    if COUNT_EMPTY:
        num_averaged = num_valid * 0.0 + B
    clip_low = tl.sum(low_acc, axis=0) / num_tokens
    clip_high = tl.sum(high_acc, axis=0) / num_tokens
    ratio_denominator = tl.maximum(num_valid, 1.0)
    if LEVEL == 2:
        ratio_denominator = num_tokens
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / tl.maximum(num_averaged, 1.0))
    tl.store(metrics_ptr + 0, clip_low + clip_high)
    tl.store(metrics_ptr + 1, clip_low)
    tl.store(metrics_ptr + 2, clip_high)
    tl.store(metrics_ptr + 3, tl.sum(ratio_acc, axis=0) / ratio_denominator)
    tl.store(metrics_ptr + 4, tl.sum(kl_acc, axis=0) / num_tokens)
    tl.store(num_averaged_ptr, num_averaged)


@triton.jit
def _gspo_backward_kernel(
    logps_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, stats_ptr, grad_loss_ptr, num_averaged_ptr, grad_ptr,
    T, stride_logps, stride_old, stride_adv, stride_mask, stride_ref, stride_grad,
    eps_low, eps_high, beta,
    LEVEL: tl.constexpr, TOKEN_ADV: tl.constexpr, HAS_KL: tl.constexpr, KL_WEIGHTED: tl.constexpr,
    POLICY_MAX: tl.constexpr, KL_MAX: tl.constexpr, NUM_STATS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = cols < T
    response = tl.load(mask_ptr + row * stride_mask + cols, mask=in_row, other=0) != 0
    length = tl.load(stats_ptr + row * NUM_STATS + 1)
    scale = tl.load(grad_loss_ptr).to(tl.float32) / tl.maximum(tl.load(num_averaged_ptr), 1.0)
    row_scale = scale / tl.maximum(length, 1.0)

    if TOKEN_ADV:
        adv = tl.where(response, tl.load(adv_ptr + row * stride_adv + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
    else:
        adv = tl.zeros([BLOCK_T], dtype=tl.float32) + tl.load(adv_ptr + row).to(tl.float32)
    logp = tl.zeros([BLOCK_T], dtype=tl.float32)
    if LEVEL == 2 or HAS_KL:
        logp = tl.where(response, tl.load(logps_ptr + row * stride_logps + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
    if LEVEL == 2:
        old = tl.where(response, tl.load(old_ptr + row * stride_old + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
        log_ratio = logp - old
    else:
        log_ratio = tl.zeros([BLOCK_T], dtype=tl.float32) + tl.load(stats_ptr + row * NUM_STATS + 2)
    ratio = tl.exp(tl.minimum(log_ratio, POLICY_MAX))
    clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    passes = (clipped == 0) & (log_ratio <= POLICY_MAX)
    coefficient = tl.where(passes, -adv * ratio, 0.0)
    if HAS_KL:
        ref = tl.where(response, tl.load(ref_ptr + row * stride_ref + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
        log_ref_ratio = ref - logp
        clamped_ref_ratio = tl.minimum(log_ref_ratio, KL_MAX)
        kl_coefficient = tl.where(log_ref_ratio <= KL_MAX, 1.0 - tl.exp(clamped_ref_ratio), 0.0)
        if KL_WEIGHTED:
            # d(ratio * kl) = ratio * d kl + kl * d ratio. Through s_i every token of the sequence
            # receives the sequence's mean KL; through a token's own ratio, that token's KL.
            if LEVEL == 0:
                kl_through_ratio = tl.load(stats_ptr + row * NUM_STATS + 6) / tl.maximum(length, 1.0)
            else:
                kl_through_ratio = tl.exp(clamped_ref_ratio) - clamped_ref_ratio - 1.0
            kl_coefficient = ratio * (kl_coefficient + tl.where(log_ratio <= POLICY_MAX, kl_through_ratio, 0.0))
        coefficient += beta * kl_coefficient
    grad = tl.where(response, coefficient * row_scale, 0.0)
    tl.store(grad_ptr + row * stride_grad + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def token_block(length: int, largest: int) -> int:
    return min(largest, triton.next_power_of_2(max(length, MIN_BLOCK_T)))


def token_blocks(largest: int) -> list[int]:
    """Every BLOCK_T token_block can choose below `largest`."""
    return [block for block in (1 << bit for bit in range(largest.bit_length())) if MIN_BLOCK_T <= block <= largest]


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """A view whose last dimension is contiguous (the kernels index rows by stride)."""
    if tensor.dtype == torch.bool:
        tensor = tensor.view(torch.uint8)
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _common(logps, old_logps, advantages, mask, ref_logps):
    token_adv = advantages.dim() == 2
    adv = _rows(advantages) if token_adv else advantages.contiguous()
    ref = _rows(ref_logps) if ref_logps is not None else logps
    # A 0/1 mask of another dtype becomes bool: the kernels read one byte per token, one specialisation.
    response = mask if mask.dtype == torch.bool else mask != 0
    return _rows(logps), _rows(old_logps), adv, _rows(response), ref, token_adv


def forward_stats(logps, old_logps, advantages, mask, ref_logps, level, eps_low, eps_high, beta, kl_weighted_by_ratio):
    """Per-sequence statistics [B, NUM_STATS] fp32 from one kernel launch."""
    logps_, old, adv, mask_, ref, token_adv = _common(logps, old_logps, advantages, mask, ref_logps)
    batch, length = logps.shape
    stats = allocate_output((batch, NUM_STATS), dtype=torch.float32, device=logps.device)
    _gspo_forward_kernel[(batch,)](
        logps_, old, adv, mask_, ref, stats,
        length, logps_.stride(0), old.stride(0), adv.stride(0) if token_adv else 0, mask_.stride(0), ref.stride(0),
        eps_low, eps_high, beta,
        LEVEL=LEVEL_CODES[level], TOKEN_ADV=token_adv, HAS_REF=ref_logps is not None,
        KL_WEIGHTED=kl_weighted_by_ratio and ref_logps is not None,  # no KL, nothing to weight: one kernel less
        POLICY_MAX=POLICY_LOG_RATIO_MAX, KL_MAX=KL_LOG_RATIO_MAX, NUM_STATS=NUM_STATS,
        BLOCK_T=token_block(length, FORWARD_BLOCK_T),
    )
    return stats


def reduce_stats(stats, level, count_empty_sequences):
    """(loss, metrics [5], number of sequences averaged over), fp32, from one kernel launch."""
    loss = allocate_output((), dtype=torch.float32, device=stats.device)
    metrics = allocate_output((5,), dtype=torch.float32, device=stats.device)
    num_averaged = allocate_output((), dtype=torch.float32, device=stats.device)
    _gspo_reduce_kernel[(1,)](
        stats, loss, metrics, num_averaged, stats.shape[0],
        LEVEL=LEVEL_CODES[level], COUNT_EMPTY=count_empty_sequences, NUM_STATS=NUM_STATS, BLOCK_B=REDUCE_BLOCK_B,
    )
    return loss, metrics, num_averaged


def backward_grad(logps, old_logps, advantages, mask, ref_logps, stats, level, eps_low, eps_high, beta,
                  kl_weighted_by_ratio, grad_loss, num_averaged):
    """d loss / d logps [B, T] in the dtype of logps, from one kernel launch."""
    logps_, old, adv, mask_, ref, token_adv = _common(logps, old_logps, advantages, mask, ref_logps)
    batch, length = logps.shape
    grad = allocate_output((batch, length), dtype=logps.dtype, device=logps.device)
    block = token_block(length, BACKWARD_BLOCK_T)
    has_kl = ref_logps is not None and beta != 0
    _gspo_backward_kernel[(batch, triton.cdiv(length, block))](
        logps_, old, adv, mask_, ref, stats, grad_loss, num_averaged, grad,
        length, logps_.stride(0), old.stride(0), adv.stride(0) if token_adv else 0, mask_.stride(0), ref.stride(0),
        grad.stride(0), eps_low, eps_high, beta,
        LEVEL=LEVEL_CODES[level], TOKEN_ADV=token_adv, HAS_KL=has_kl, KL_WEIGHTED=kl_weighted_by_ratio and has_kl,
        POLICY_MAX=POLICY_LOG_RATIO_MAX, KL_MAX=KL_LOG_RATIO_MAX, NUM_STATS=NUM_STATS, BLOCK_T=block,
    )
    return grad
