"""Triton epilogues of the streamed lm_head: a logits tile's statistics, and its d logits.

cuBLAS computes each tile of logits [rows, vocabulary chunk] (gspo_kernels/wide_matmul.py: fp32
results from bf16 operands, no rounding), and one Triton kernel then reads the tile once:

- `_tile_stats_kernel`, one program per row, folds the tile into the row's running max, sum of
  exp (and sum of exp * z for the entropy) and picks the target logit, applying the bias and the
  temperature as it reads;
- `_tile_dlogits_kernel`, one program per (row, BLOCK_V columns), writes
  d loss / d logits = (g_logp (onehot - p) - g_entropy p (log p + entropy)) / temperature
  in the operand dtype, ready for the two matmuls that give d hidden and d weight.

Why not the PyTorch epilogue: it makes about eight passes over each fp32 tile (convert, bias,
temperature, max, exp, sums, gather; then subtract, exp, scale, scatter, convert), some 58 bytes
of memory traffic per logit against 8 here for the statistics and 10 for d logits (logit read,
d logit written). At N = 16,384 tokens and V = 151,936 that is about 145 GB against 45 GB per
forward + backward, 40 ms against 13 ms at an H200's 3.5 TB/s. Why not the logits in Triton too:
a `tl.dot` tile kernel measured 187.8 ms at that shape on an H200, no faster than cuBLAS tiles
with the PyTorch epilogue (189.5 ms; bench/RESULTS.md, second H200 run), against 104 ms for the
8NHV FLOPs at the card's matmul ceiling.

Imported lazily by gspo_kernels/fused_linear.py, so gspo_kernels imports without triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gspo_kernels.fused_linear_stream import stream_tile
from gspo_kernels.wide_matmul import mm_fp32

# Columns a program handles per step. The statistics kernel loops over the tile's width in
# steps of it; the d logits kernel takes one step per program.
STATS_BLOCK_V = 2048
DLOGITS_BLOCK_V = 2048
NUM_WARPS = 8

# Output allocator (a shape tuple, dtype, device); tests swap in one that poisons outputs with NaN to prove every
# element is written.
allocate_output = torch.empty


@triton.jit
def _scaled_logits(row_ptr, bias_ptr, cols, col_ok, vocab_start, inv_temperature, other, HAS_BIAS: tl.constexpr):
    """z = (logits + bias) * inv_temperature of one row's columns, fp32; `other` where col_ok is False."""
    z = tl.load(row_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + vocab_start + cols, mask=col_ok, other=0.0).to(tl.float32)
    return tl.where(col_ok, z * inv_temperature, other)


@triton.jit
def _tile_stats_kernel(logits_ptr, bias_ptr, targets_ptr, max_ptr, sum_exp_ptr, sum_exp_z_ptr, target_logit_ptr,
                       width, vocab_start, stride_lm, inv_temperature,
                       HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_lm
    run_max = tl.load(max_ptr + row)
    sum_exp = tl.load(sum_exp_ptr + row)
    sum_exp_z = 0.0
    if WITH_ENTROPY:
        sum_exp_z = tl.load(sum_exp_z_ptr + row)
    for c0 in range(0, width, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        col_ok = cols < width
        z = _scaled_logits(row_ptr, bias_ptr, cols, col_ok, vocab_start, inv_temperature, float("-inf"), HAS_BIAS)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max)
        sum_exp = sum_exp * rescale + tl.sum(p, axis=0)
        if WITH_ENTROPY:
            # padding columns hold z = -inf and p = 0: multiply p by 0 there, not by -inf
            sum_exp_z = sum_exp_z * rescale + tl.sum(p * tl.where(col_ok, z, 0.0), axis=0)
        run_max = new_max
    tl.store(max_ptr + row, run_max)
    tl.store(sum_exp_ptr + row, sum_exp)
    if WITH_ENTROPY:
        tl.store(sum_exp_z_ptr + row, sum_exp_z)
    target = tl.load(targets_ptr + row) - vocab_start
    in_tile = (target >= 0) & (target < width)
    safe = tl.where(in_tile, target, 0)
    z_target = tl.load(row_ptr + safe, mask=in_tile, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z_target += tl.load(bias_ptr + vocab_start + safe, mask=in_tile, other=0.0).to(tl.float32)
    tl.store(target_logit_ptr + row, z_target * inv_temperature, mask=in_tile)


@triton.jit
def _tile_dlogits_kernel(logits_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
                         out_ptr, width, vocab_start, stride_lm, stride_om, inv_temperature,
                         HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < width
    z = _scaled_logits(logits_ptr + row * stride_lm, bias_ptr, cols, col_ok, vocab_start, inv_temperature, 0.0,
                       HAS_BIAS)
    grad_logp = tl.load(grad_logp_ptr + row)
    log_p = z - tl.load(lse_ptr + row)
    p = tl.exp(log_p)
    if WITH_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        grad_entropy = tl.load(grad_entropy_ptr + row)
        dz = -p * (grad_logp + grad_entropy * (log_p + entropy))
    else:
        dz = -p * grad_logp
    target = tl.load(targets_ptr + row) - vocab_start
    dz = tl.where(cols == target, dz + grad_logp, dz) * inv_temperature
    tl.store(out_ptr + row * stride_om + cols, dz.to(out_ptr.dtype.element_ty), mask=col_ok)


def _token_ids(targets: torch.Tensor) -> torch.Tensor:
    """Token ids of any integer dtype as the int64 the kernels are built for."""
    return targets.to(torch.int64).contiguous()


def _logits(hidden_rows: torch.Tensor, weight: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """hidden_rows @ weight[v0:v1].T in fp32, through cuBLAS (or the CPU's BLAS under the interpreter)."""
    return mm_fp32(hidden_rows, weight[v0:v1].t())


def logprob_stats(hidden_rows, weight, bias, targets, inv_temperature, with_entropy):
    """(logp, lse, entropy or None) fp32 [R] for hidden rows [R, H]; see the module docstring."""
    num_rows = hidden_rows.shape[0]
    state = {"dtype": torch.float32, "device": hidden_rows.device}
    run_max = torch.full((num_rows,), float("-inf"), **state)
    sum_exp = torch.zeros(num_rows, **state)
    sum_exp_z = torch.zeros(num_rows, **state) if with_entropy else sum_exp
    # NaN until the tile holding a row's target writes it: a target no tile holds shows as NaN
    target_logit = torch.full((num_rows,), float("nan"), **state)
    token_ids = _token_ids(targets)
    row_chunk, vocab_chunk = stream_tile(hidden_rows.device)
    for r0 in range(0, num_rows, row_chunk):
        r1 = min(r0 + row_chunk, num_rows)
        for v0 in range(0, weight.shape[0], vocab_chunk):
            v1 = min(v0 + vocab_chunk, weight.shape[0])
            tile = _logits(hidden_rows[r0:r1], weight, v0, v1)
            _tile_stats_kernel[(r1 - r0,)](
                tile, bias if bias is not None else tile, token_ids[r0:r1], run_max[r0:r1], sum_exp[r0:r1],
                sum_exp_z[r0:r1], target_logit[r0:r1], v1 - v0, v0, tile.stride(0), inv_temperature,
                HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, BLOCK_V=STATS_BLOCK_V, num_warps=NUM_WARPS,
            )
    lse = run_max + torch.log(sum_exp)
    entropy = lse - sum_exp_z / sum_exp if with_entropy else None
    return target_logit - lse, lse, entropy


def dlogits_tile(hidden_rows, weight, bias, v0, v1, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature):
    """d loss / d logits [R, v1 - v0] in the dtype of hidden, from hidden rows [R, H] and their statistics."""
    num_rows = hidden_rows.shape[0]
    out = allocate_output((num_rows, v1 - v0), dtype=hidden_rows.dtype, device=hidden_rows.device)
    if num_rows == 0 or v1 == v0:
        return out
    tile = _logits(hidden_rows, weight, v0, v1)
    with_entropy = grad_entropy is not None
    lse, grad_logp = (t.float().contiguous() for t in (lse, grad_logp))
    # without entropy the kernel never reads its two entropy pointers
    entropy, grad_entropy = (t.float().contiguous() for t in (entropy, grad_entropy)) if with_entropy else (lse, lse)
    _tile_dlogits_kernel[(num_rows, triton.cdiv(v1 - v0, DLOGITS_BLOCK_V))](
        tile, bias if bias is not None else tile, _token_ids(targets), lse, entropy, grad_logp, grad_entropy, out,
        v1 - v0, v0, tile.stride(0), out.stride(0), inv_temperature,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, BLOCK_V=DLOGITS_BLOCK_V, num_warps=NUM_WARPS,
    )
    return out
