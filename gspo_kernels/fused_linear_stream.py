"""The streaming lm_head algorithm in PyTorch: tiles of rows x vocabulary, online log-sum-exp.

Nothing here holds more than one tile of logits [rows, vocabulary chunk] at a time, except
`kept_logits`, which holds the logits of a group of rows on purpose (see gspo_kernels/fused_linear.py
for when that pays), in a buffer its caller allocates once for every group. On the "triton"
backend the two epilogues of a tile (its statistics over the vocabulary, its d logits) run as
Triton kernels (gspo_kernels/fused_linear_triton.py); every matmul (the logits of a tile, the
two that turn d logits into d hidden and d weight, those that fill a kept buffer) stays with the
BLAS library of the device, with fp32 results from bf16 operands where torch supports them
(gspo_kernels/wide_matmul.py).

Notation: z = (hidden @ weight.T + bias) / temperature, lse = logsumexp(z), p = exp(z - lse).
    d logp(target) / d z_j = onehot_j - p_j
    d entropy / d z_j      = -p_j (log p_j + entropy)
and d / d logits = (d / d z) / temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gspo_kernels.wide_matmul import add_product_, mm_fp32

# Rows x vocabulary entries of one logits tile, by device type. CPU: 512 x 8192, a 16 MiB fp32
# tile whose matmuls run near the BLAS peak (about 100 GFLOP/s for H = 512 on 2 cores, against 70
# at 4096 entries). CUDA: 8192 x 8192, a 256 MiB tile: on an H200 the lm_head loss at N = 16,384,
# H = 4096, V = 151,936 took 194 ms with it, 207 ms at 4096 rows and 467 ms at 512 (bench/RESULTS.md, with
# the PyTorch epilogues; bench/gpu_profile.py sweeps the tile shapes again with the Triton ones).
STREAM_TILES = {"cpu": (512, 8192), "cuda": (8192, 8192)}


def stream_tile(device: torch.device) -> tuple[int, int]:
    """(rows, vocabulary entries) of one streamed logits tile on `device`."""
    return STREAM_TILES["cuda" if device.type == "cuda" else "cpu"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16 / fp16 / fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class Grads:
    """Accumulators for d hidden rows [N, H], d weight [V, H], d bias [V]; None when not wanted."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def logits_tile(hidden_rows, weight, bias, v0, v1, inv_temperature, out=None):
    """z for rows [R, H] and vocabulary [v0, v1): [R, v1 - v0] in the accumulation dtype, in `out` if given."""
    weight_tile = weight[v0:v1].t()
    if out is None:
        tile = mm_fp32(hidden_rows, weight_tile)
    elif out.dtype == hidden_rows.dtype:
        tile = torch.mm(hidden_rows, weight_tile, out=out)
    else:
        tile = out.copy_(mm_fp32(hidden_rows, weight_tile))
    if bias is not None:
        tile += bias[v0:v1].to(tile.dtype)
    if inv_temperature != 1.0:
        tile *= inv_temperature
    return tile


class OnlineLogSumExp:
    """Running max, sum of exp, sum of exp * z and target logit over vocabulary tiles of rows."""

    def __init__(self, targets: torch.Tensor, dtype: torch.dtype, with_entropy: bool):
        rows = targets.shape[0]
        self.targets = targets
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=targets.device)
        self.sum_exp = torch.zeros(rows, dtype=dtype, device=targets.device)
        self.sum_exp_z = torch.zeros(rows, dtype=dtype, device=targets.device) if with_entropy else None
        self.target_logit = torch.zeros(rows, dtype=dtype, device=targets.device)

    def update_(self, tile: torch.Tensor, v0: int) -> torch.Tensor:
        """Fold in the tile z [R, Vc] at vocabulary offset v0; returns the row max m it used.

        Without entropy the tile is overwritten with exp(z - m), which a kept tile reuses in
        backward (p = exp(z - m) * exp(m - lse)) instead of exponentiating again.
        """
        in_tile = (self.targets >= v0) & (self.targets < v0 + tile.shape[1])
        local = (self.targets - v0).clamp(0, tile.shape[1] - 1)
        picked = tile.gather(1, local[:, None]).squeeze(1)
        self.target_logit = torch.where(in_tile, picked, self.target_logit)
        new_max = torch.maximum(self.max, tile.amax(dim=1))
        rescale = torch.exp(self.max - new_max)
        if self.sum_exp_z is None:
            p = tile.sub_(new_max[:, None]).exp_()
        else:
            p = torch.exp(tile - new_max[:, None])
            self.sum_exp_z = self.sum_exp_z * rescale + (p * tile).sum(dim=1)
        self.sum_exp = self.sum_exp * rescale + p.sum(dim=1)
        self.max = new_max
        return new_max

    def result(self):
        """(logp of the target, lse, entropy or None), each [R]."""
        lse = self.max + torch.log(self.sum_exp)
        entropy = None if self.sum_exp_z is None else lse - self.sum_exp_z / self.sum_exp
        return self.target_logit - lse, lse, entropy


def stream_stats_torch(hidden_rows, weight, bias, targets, inv_temperature, with_entropy):
    """(logp, lse, entropy or None) [R] for rows [R, H], one vocabulary tile at a time."""
    stats = OnlineLogSumExp(targets, accumulation_dtype(hidden_rows.dtype), with_entropy)
    _, vocab_chunk = stream_tile(hidden_rows.device)
    for v0 in range(0, weight.shape[0], vocab_chunk):
        v1 = min(v0 + vocab_chunk, weight.shape[0])
        stats.update_(logits_tile(hidden_rows, weight, bias, v0, v1, inv_temperature), v0)
    return stats.result()


def logits_to_dlogits_(tile, v0, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature):
    """Turn the tile z [R, Vc] in place into d loss / d logits, from the row gradients [R]."""
    tile.sub_(lse[:, None])  # log p
    if grad_entropy is None:
        tile.exp_().mul_(-grad_logp[:, None])
    else:
        # -p (g_logp + g_entropy (log p + entropy))
        coefficient = tile.mul(grad_entropy[:, None]).add_((grad_logp + grad_entropy * entropy)[:, None])
        tile.exp_().mul_(coefficient).neg_()
    in_tile = (targets >= v0) & (targets < v0 + tile.shape[1])
    rows = in_tile.nonzero().squeeze(1)
    tile[rows, targets[rows] - v0] += grad_logp[rows]
    if inv_temperature != 1.0:
        tile.mul_(inv_temperature)
    return tile


def dlogits_tile_torch(hidden_rows, weight, bias, v0, v1, targets, lse, entropy, grad_logp, grad_entropy,
                       inv_temperature):
    """d loss / d logits [R, v1 - v0] of rows [R, H], recomputing their logits."""
    tile = logits_tile(hidden_rows, weight, bias, v0, v1, inv_temperature)
    return logits_to_dlogits_(tile, v0, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature)


def accumulate_tile_grads(dlogits, hidden_rows, weight_tile, hidden_grad, weight_grad, bias_grad) -> None:
    """hidden_grad += dlogits @ weight_tile; weight_grad += dlogits.T @ hidden_rows; bias_grad += column sums."""
    if bias_grad is not None:
        bias_grad += dlogits.sum(dim=0).to(bias_grad.dtype)
    dlogits = dlogits.to(hidden_rows.dtype)
    if hidden_grad is not None:
        add_product_(hidden_grad, dlogits, weight_tile)
    if weight_grad is not None:
        add_product_(weight_grad, dlogits.t(), hidden_rows)


def _chunk_accumulator(grad: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor | None:
    """Where a vocabulary chunk's gradient sums: grad[v0:v1] itself, or fp32 scratch for a bf16 grad."""
    if grad is None:
        return None
    dtype = accumulation_dtype(grad.dtype)
    return grad[v0:v1] if grad.dtype == dtype else torch.zeros(grad[v0:v1].shape, dtype=dtype, device=grad.device)


def _store_chunk(grad: torch.Tensor | None, v0: int, accumulator: torch.Tensor | None) -> None:
    if grad is not None and accumulator.dtype != grad.dtype:
        grad[v0:v0 + accumulator.shape[0]] += accumulator.to(grad.dtype)


def stream_grads(hidden_rows, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                 grads: Grads, dlogits_tile=dlogits_tile_torch) -> None:
    """Accumulate into `grads` the gradients of rows [R, H], recomputing their logits tile by tile.

    Vocabulary chunks outside, rows inside: a chunk's d weight sums over every row in fp32 and
    is stored once, so a bf16 d weight needs no fp32 copy of its own. `dlogits_tile` is
    `dlogits_tile_torch` or the Triton kernel of the same signature.
    """
    num_rows = hidden_rows.shape[0]
    row_chunk, vocab_chunk = stream_tile(hidden_rows.device)
    for v0 in range(0, weight.shape[0], vocab_chunk):
        v1 = min(v0 + vocab_chunk, weight.shape[0])
        weight_grad, bias_grad = _chunk_accumulator(grads.weight, v0, v1), _chunk_accumulator(grads.bias, v0, v1)
        for r0 in range(0, num_rows, row_chunk):
            rows = slice(r0, min(r0 + row_chunk, num_rows))
            dlogits = dlogits_tile(
                hidden_rows[rows], weight, bias, v0, v1, targets[rows], lse[rows],
                None if entropy is None else entropy[rows], grad_logp[rows],
                None if grad_entropy is None else grad_entropy[rows], inv_temperature,
            )
            hidden_grad = None if grads.hidden is None else grads.hidden[rows]
            accumulate_tile_grads(dlogits, hidden_rows[rows], weight[v0:v1], hidden_grad, weight_grad, bias_grad)
        _store_chunk(grads.weight, v0, weight_grad)
        _store_chunk(grads.bias, v0, bias_grad)


def kept_logits(hidden_rows, weight, bias, targets, inv_temperature, buffer):
    """Every vocabulary tile of rows [R, H], kept as (exp(z - m), m [R], its first vocabulary entry):
    (tiles, logp [R], lse [R]).

    The tiles are contiguous views of `buffer`, a 1-D tensor of at least R * V elements of the
    accumulation dtype: one allocation, reused by every kept chunk, instead of a tile's worth of
    memory allocated and freed per tile, which the CPU allocator returned to the system only in
    part (extra peak memory that varied from run to run).
    """
    stats = OnlineLogSumExp(targets, accumulation_dtype(hidden_rows.dtype), with_entropy=False)
    tiles = []
    num_rows = hidden_rows.shape[0]
    _, vocab_chunk = stream_tile(hidden_rows.device)
    for v0 in range(0, weight.shape[0], vocab_chunk):
        v1 = min(v0 + vocab_chunk, weight.shape[0])
        out = buffer[num_rows * v0:num_rows * v1].view(num_rows, v1 - v0)
        tile = logits_tile(hidden_rows, weight, bias, v0, v1, inv_temperature, out=out)
        tiles.append((tile, stats.update_(tile, v0), v0))
    logp, lse, _ = stats.result()
    return tiles, logp, lse


def kept_grads(tiles, hidden_rows, weight, targets, lse, grad_logp, inv_temperature, grads: Grads):
    """Turn kept tiles into d logits in place, one at a time, and add their gradients to `grads`."""
    for tile, tile_max, v0 in tiles:
        v1 = v0 + tile.shape[1]
        # d logits = g (onehot - p) / temperature, with p = tile * exp(m - lse)
        tile.mul_((-grad_logp * torch.exp(tile_max - lse) * inv_temperature)[:, None])
        in_tile = (targets >= v0) & (targets < v1)
        hit = in_tile.nonzero().squeeze(1)
        tile[hit, targets[hit] - v0] += grad_logp[hit] * inv_temperature
        accumulate_tile_grads(
            tile, hidden_rows, weight[v0:v1], grads.hidden,
            None if grads.weight is None else grads.weight[v0:v1], None if grads.bias is None else grads.bias[v0:v1],
        )
