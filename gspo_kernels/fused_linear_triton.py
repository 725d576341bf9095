"""Triton kernels of the streamed lm_head: log-prob statistics, and d logits of a tile.

Both kernels compute logits tiles themselves: `tl.dot` of a [BLOCK_M, BLOCK_K] block of hidden
by a [BLOCK_K, BLOCK_V] block of weight.T, in the input dtype (bf16 on the tensor cores, fp32 as
tf32x3: gspo_kernels/dot_triton.py), with an fp32 accumulator; block sizes per dtype in TILE_BLOCKS. Neither writes anything of size V per token except `dlogits_tile`'s output,
whose width is the caller's vocabulary chunk.

- `logprob_stats`: one program per BLOCK_M rows sweeps the whole vocabulary with an online
  max / sum-exp (and sum-exp * z for the entropy), picks the target logit on the fly, and writes
  logp, lse and entropy per row.
- `dlogits_tile`: one program per (BLOCK_M rows, BLOCK_V vocabulary) block recomputes z and
  writes d loss / d logits = (g_logp (onehot - p) - g_entropy p (log p + entropy)) / temperature
  in the input dtype; the caller turns it into d hidden and d weight with two matmuls.

Imported lazily by gspo_kernels/fused_linear.py, so gspo_kernels imports without triton.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gspo_kernels.dot_triton import dot_precision

class TileBlocks(NamedTuple):
    """Block sizes and launch options of both kernels for one input dtype."""

    BLOCK_M: int
    BLOCK_V: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

    @property
    def constexprs(self) -> dict:
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_V": self.BLOCK_V, "BLOCK_K": self.BLOCK_K}

    @property
    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# 8 warps: the softmax epilogue holds several fp32 [BLOCK_M, BLOCK_V] tiles, which spill from 4
# warps' registers (sm_80 and sm_90); with 3 stages ptxas for sm_100 spilled one register of the
# bf16 statistics kernel. fp32 operands split in two for tf32x3: a K step of 16 keeps them in
# registers on sm_80 (gspo_kernels/compile_check.py checks every entry).
TILE_BLOCKS = {
    torch.float32: TileBlocks(64, 128, 16, num_warps=8, num_stages=3),
    torch.bfloat16: TileBlocks(64, 128, 64, num_warps=8, num_stages=4),
    torch.float16: TileBlocks(64, 128, 64, num_warps=8, num_stages=4),
}


def tile_blocks(dtype: torch.dtype) -> TileBlocks:
    return TILE_BLOCKS[dtype]


@triton.jit
def _logits_block(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, hidden_size,
                  stride_hm, stride_wv, inv_temperature, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """z = (hidden[rows] @ weight[cols].T + bias[cols]) * inv_temperature, fp32 [BLOCK_M, BLOCK_V]."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden_size
        h = tl.load(hidden_ptr + rows[:, None] * stride_hm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[None, :] * stride_wv + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


@triton.jit
def _logprob_stats_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, logp_ptr, lse_ptr, entropy_ptr,
                          num_rows, vocab_size, hidden_size, stride_hm, stride_wv, inv_temperature,
                          HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_M,), tl.float32)
    sum_exp_z = tl.zeros((BLOCK_M,), tl.float32)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, vocab_size, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab_size
        z = _logits_block(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, hidden_size,
                          stride_hm, stride_wv, inv_temperature, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            # padding columns hold z = -inf and p = 0: multiply p by 0 there, not by -inf
            sum_exp_z = sum_exp_z * rescale + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), axis=1)
        run_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    lse = run_max + tl.log(sum_exp)
    tl.store(logp_ptr + rows, target_logit - lse, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, lse - sum_exp_z / sum_exp, mask=row_ok)


@triton.jit
def _dlogits_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr,
                    grad_entropy_ptr, out_ptr, num_rows, vocab_start, vocab_end, hidden_size,
                    stride_hm, stride_wv, stride_om, inv_temperature,
                    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = vocab_start + local_cols
    row_ok = rows < num_rows
    col_ok = cols < vocab_end
    z = _logits_block(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, hidden_size,
                      stride_hm, stride_wv, inv_temperature, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    if WITH_ENTROPY:
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        dz = -p * (grad_logp[:, None] + grad_entropy[:, None] * (log_p + entropy[:, None]))
    else:
        dz = -p * grad_logp[:, None]
    dz += tl.where(cols[None, :] == targets[:, None], grad_logp[:, None], 0.0)
    dz = dz * inv_temperature
    out = out_ptr + rows[:, None] * stride_om + local_cols[None, :]
    tl.store(out, dz.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _contiguous_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _token_ids(targets: torch.Tensor) -> torch.Tensor:
    """Token ids of any integer dtype as the int64 the kernels are built for."""
    return targets.to(torch.int64).contiguous()


def logprob_stats(hidden_rows, weight, bias, targets, inv_temperature, with_entropy):
    """(logp, lse, entropy or None) fp32 [R] for hidden rows [R, H]; see the module docstring."""
    hidden_rows, weight = _contiguous_rows(hidden_rows), _contiguous_rows(weight)
    num_rows, hidden_size = hidden_rows.shape
    poison = {"dtype": torch.float32, "device": hidden_rows.device}
    logp = torch.full((num_rows,), float("nan"), **poison)
    lse = torch.full((num_rows,), float("nan"), **poison)
    entropy = torch.full((num_rows,), float("nan"), **poison) if with_entropy else lse
    if num_rows == 0:
        return logp, lse, entropy if with_entropy else None
    blocks = tile_blocks(hidden_rows.dtype)
    _logprob_stats_kernel[(triton.cdiv(num_rows, blocks.BLOCK_M),)](
        hidden_rows, weight, bias if bias is not None else weight, _token_ids(targets), logp, lse, entropy,
        num_rows, weight.shape[0], hidden_size, hidden_rows.stride(0), weight.stride(0), inv_temperature,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, PRECISION=dot_precision(hidden_rows.dtype),
        **blocks.constexprs, **blocks.options,
    )
    return logp, lse, entropy if with_entropy else None


def dlogits_tile(hidden_rows, weight, bias, v0, v1, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature):
    """d loss / d logits [R, v1 - v0] in the dtype of hidden, recomputed from hidden rows [R, H]."""
    hidden_rows, weight = _contiguous_rows(hidden_rows), _contiguous_rows(weight)
    num_rows, hidden_size = hidden_rows.shape
    out = torch.full((num_rows, v1 - v0), float("nan"), dtype=hidden_rows.dtype, device=hidden_rows.device)
    if num_rows == 0:
        return out
    with_entropy = grad_entropy is not None
    blocks = tile_blocks(hidden_rows.dtype)
    grid = (triton.cdiv(num_rows, blocks.BLOCK_M), triton.cdiv(v1 - v0, blocks.BLOCK_V))
    _dlogits_kernel[grid](
        hidden_rows, weight, bias if bias is not None else weight, _token_ids(targets), lse.float().contiguous(),
        entropy.float().contiguous() if with_entropy else lse, grad_logp.float().contiguous(),
        grad_entropy.float().contiguous() if with_entropy else lse, out,
        num_rows, v0, v1, hidden_size, hidden_rows.stride(0), weight.stride(0), out.stride(0), inv_temperature,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, PRECISION=dot_precision(hidden_rows.dtype),
        **blocks.constexprs, **blocks.options,
    )
    return out
