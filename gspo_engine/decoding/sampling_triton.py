"""Keyed sampling from the full softmax in one pass over the logits: a Triton kernel for CUDA decode steps.

sample_next's PyTorch path draws argmax(p / q), q = -log(u) with u hashed from each row's key and the
column (decoding/sampling.keyed_uniform): some twenty elementwise passes over [rows, V] int64 tensors,
which at 256 rows of Qwen3's 151,936 logits read and write several GB per decode step. This kernel
hashes in registers and finds, per row in one pass, the log-sum-exp of logits / T and the argmax of
logits / T - log(q), the same token (a monotone transform of p / q, up to rounding in near ties),
with its log-prob. It serves the sampling the trainer runs by default: a temperature, no top-k, no top-p.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048


@triton.jit
def _mix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 (decoding/sampling.mix32)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _keyed_sample_kernel(logits_ptr, keys_ptr, tokens_ptr, logps_ptr, V, stride_row, inv_temperature,
                         BLOCK_V: tl.constexpr):
    """Row r: token = argmax_v(logits[r, v] / T - log(-log(u[r, v]))), logp = logits[r, token] / T - lse_v."""
    row = tl.program_id(0)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    columns = tl.arange(0, BLOCK_V)
    tiny = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny, as sample_next clamps q
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    best_score = tl.full((), float("-inf"), tl.float32)
    best_scaled = tl.zeros((), tl.float32)
    best_column = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK_V):
        column = start + columns
        valid = column < V
        scaled = tl.load(logits_ptr + row.to(tl.int64) * stride_row + column, mask=valid, other=float("-inf")) * inv_temperature
        block_max = tl.max(scaled, axis=0)
        new_max = tl.maximum(running_max, block_max)
        # exp(-inf - -inf) would be NaN: while every logit so far is -inf (masked), nothing is added.
        rescale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        terms = tl.where(scaled == float("-inf"), 0.0, tl.exp(scaled - new_max))
        running_sum = running_sum * rescale + tl.sum(terms, axis=0)
        running_max = new_max
        bits = _mix32(key ^ _mix32(column.to(tl.uint32) ^ 0x9E3779B9))
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24
        noise = tl.maximum(-tl.log(uniform), tiny)
        score = tl.where(valid, scaled - tl.log(noise), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_column = tl.argmax(score, axis=0)
        # Strictly greater: an earlier column keeps a tie, as torch.argmax does.
        better = block_best > best_score
        best_score = tl.where(better, block_best, best_score)
        best_column = tl.where(better, (start + block_column).to(tl.int64), best_column)
        best_scaled = tl.where(better, tl.sum(tl.where(columns == block_column, scaled, 0.0), axis=0), best_scaled)
    tl.store(tokens_ptr + row, best_column)
    tl.store(logps_ptr + row, best_scaled - running_max - tl.log(running_sum))


def keyed_sample(logits: torch.Tensor, temperature: float, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens int64 [R] and their log-probs fp32 [R] under softmax(logits / temperature), logits fp32 [R, V],
    drawn with the uniforms of keys int64 [R] (decoding/sampling.token_keys)."""
    rows, vocab = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logps = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _keyed_sample_kernel[(rows,)](logits, keys.contiguous(), tokens, logps, vocab, logits.stride(0),
                                      1.0 / temperature, BLOCK_V=BLOCK_V)
    return tokens, logps
