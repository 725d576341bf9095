"""Triton kernels of MoE routing and the grouped SwiGLU experts; the algorithm is in gspo_kernels/moe.py.

Routing: `_route_topk_kernel`, one program per block of tokens: fp32 softmax, top-k by repeated
argmax (ties to the lower expert index), renormalisation.

Permutation, a two-pass stable counting sort of the N*k (token, slot) pairs by expert:
`_count_experts_kernel` counts the pairs of each block of 128 per expert, a cumsum over blocks
(PyTorch, [blocks, E] integers) gives each block its first row per expert, and
`_place_pairs_kernel` writes every pair to its sorted row. Padding to the GEMM tile exists only in
the tile table (`_tile_table_kernel`: expert, first row, end row of every BLOCK_M tile, sized for
the worst case so the host never waits for the counts), so tiles never straddle two experts and
no row of x is ever copied or padded.

GEMMs (fp32 accumulation, operands in the storage dtype so bf16 runs on tensor cores; fp32 as
tf32x3, gspo_kernels/dot_triton.py):
- `_gate_up_kernel`: h = silu(x[token] @ Wg^T) * (x[token] @ Wu^T), x rows gathered in the loads,
  both projections in one program, SwiGLU in the epilogue; stores the pre-activations when
  backward needs them.
- `_scatter_matmul_kernel`: out[pair] = scale[pair] * (A[s] @ W_e): the down projection times
  the routing weight (forward) and dx through w_gate_up (backward), each row written to its
  pair's own row, so the sum over the k slots is a deterministic reduction, not atomics.
- `_swiglu_grad_kernel`: dh = dy[token] @ Wd_e, d topk_weights = <dh, h> (per group of 16
  columns, summed afterwards, so the result does not depend on the tile shape), the SwiGLU
  derivative, and h recomputed from the stored pre-activations for the weight gradient.
- `_expert_weight_grad_kernel`: dW_e = sum over the expert's rows of A^T B, one program per
  (expert, output tile), looping over the expert's rows; an expert with no row writes zeros.

Memory: forward keeps h [S, I] and the per-pair rows [S, H] only until y is summed, and hands
the pre-activations [S, 2I] to autograd; backward allocates d gate_up [S, 2I], h [S, I] (recomputed
from the pre-activations), the per-pair rows of dx [S, H] and the partial d topk_weights
[S, I / 16] in fp32 (S = N * k).

BLOCK_M follows the average rows per expert (16 when decoding a few tokens, up to 128 when
training on thousands); the other block sizes, warps and stages are autotuned per (N rounded up
to a power of two, E, H, I) from 1024 tokens up, and fixed below, where reading the weights
dominates, among the configs of GEMM_TILES for the operand size, BLOCK_M and the card's
architecture. Under TRITON_INTERPRET=1 the kernels run one fixed small tile.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gspo_kernels.dot_triton import dot_precision
from gspo_kernels.expert_order import ExpertOrder

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PAIR_BLOCK = 128  # pairs per program of the counting sort
GROUP = 16  # columns per partial sum of d topk_weights

# Output allocator; tests swap in one that poisons outputs with NaN to prove every element is written.
allocate_output = torch.empty

ARCHS = (80, 90, 100)  # the cards the configs are checked for: A100, H100 / H200, B200


class Tile(NamedTuple):
    """One autotune config: the block sizes it sets, its warps and stages, the archs it may run on."""

    blocks: tuple  # ((name, size), ...)
    num_warps: int
    num_stages: int
    archs: tuple = ARCHS

    @property
    def config(self) -> triton.Config:
        return _CONFIGS.setdefault(self, triton.Config(dict(self.blocks), num_warps=self.num_warps,
                                                       num_stages=self.num_stages))


_CONFIGS: dict = {}


def _tiles(*rows, archs=ARCHS) -> list[Tile]:
    """Row-tile GEMM configs from (BLOCK_N, BLOCK_K, num_warps, num_stages) rows."""
    return [Tile((("BLOCK_N", n), ("BLOCK_K", k)), warps, stages, archs) for n, k, warps, stages in rows]


# Autotune configs per kernel, per operand size in bytes (2: bf16 / fp16, 4: fp32) and BLOCK_M
# (from block_rows(); None for the weight gradients, whose tiles set it). The last of each list
# runs small batches without a search; the configs of an arch are the entries that name it.
# Every entry compiles without spilling and fits the shared memory of each arch it names
# (gspo_kernels/compile_check.py checks them all): registers run out first, so wide tiles take 8
# warps, and fp32 operands (split in two for tf32x3) take half the K step of bf16.
GEMM_TILES = {
    "_gate_up_kernel": {
        (2, 16): _tiles((128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 32): _tiles((128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 64): _tiles((128, 64, 4, 4), archs=(90, 100)) + _tiles((128, 64, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 128): _tiles((128, 64, 8, 3), (64, 64, 4, 4), archs=(90, 100)) + _tiles((64, 64, 8, 4)),
        (4, 16): _tiles((128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)),
        (4, 32): _tiles((128, 32, 8, 3), (64, 32, 4, 4), (64, 16, 4, 4)),
        (4, 64): _tiles((128, 16, 8, 4)) + _tiles((64, 16, 4, 4), archs=(90, 100)) + _tiles((64, 32, 8, 3)),
        (4, 128): _tiles((64, 16, 8, 4), archs=(90, 100)) + _tiles((32, 32, 8, 3)),
    },
    "_scatter_matmul_kernel": {
        (2, 16): _tiles((128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 32): _tiles((128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 64): _tiles((128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 128): _tiles((128, 64, 4, 4), archs=(90, 100)) + _tiles((128, 64, 8, 3))
        + _tiles((64, 64, 4, 4), archs=(90, 100)) + _tiles((64, 64, 8, 4), archs=(80,))
        + _tiles((64, 128, 4, 3), archs=(90, 100)),
        (4, 16): _tiles((128, 32, 8, 3), (64, 32, 4, 4)),
        (4, 32): _tiles((128, 32, 8, 3), (64, 32, 4, 4)),
        (4, 64): _tiles((128, 32, 8, 3)) + _tiles((64, 64, 4, 3), archs=(90, 100)) + _tiles((64, 32, 4, 4)),
        (4, 128): _tiles((128, 32, 8, 3), (64, 32, 4, 4), archs=(90, 100)) + _tiles((64, 32, 8, 3)),
    },
    "_swiglu_grad_kernel": {
        (2, 16): _tiles((128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 32): _tiles((128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 64): _tiles((128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)),
        (2, 128): _tiles((64, 64, 8, 3), (64, 64, 8, 4), (32, 64, 4, 4)),
        (4, 16): _tiles((128, 32, 8, 3), (64, 32, 4, 4)),
        (4, 32): _tiles((128, 32, 8, 3), (64, 32, 4, 4)),
        (4, 64): _tiles((64, 32, 8, 3), (32, 32, 4, 4)),
        (4, 128): _tiles((64, 32, 8, 3), (32, 32, 8, 3), (32, 32, 4, 4)),
    },
    # Weight gradients: an output tile BLOCK_M x BLOCK_N per program, BLOCK_K sorted rows per step.
    "_expert_weight_grad_kernel": {
        (2, None): [Tile((("BLOCK_M", 128), ("BLOCK_N", 128), ("BLOCK_K", 64)), 8, 3),
                    Tile((("BLOCK_M", 128), ("BLOCK_N", 64), ("BLOCK_K", 64)), 4, 4),
                    Tile((("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_K", 32)), 4, 3)],
        (4, None): [Tile((("BLOCK_M", 128), ("BLOCK_N", 128), ("BLOCK_K", 32)), 8, 3),
                    Tile((("BLOCK_M", 128), ("BLOCK_N", 64), ("BLOCK_K", 32)), 4, 4, archs=(90,)),
                    Tile((("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_K", 16)), 4, 3)],
    },
}


def gemm_tiles(kernel_name: str, dtype: torch.dtype, block_m: int | None, arch: int) -> list[Tile]:
    """The configs `kernel_name` may run on sm_`arch` for operands of `dtype` at BLOCK_M `block_m`."""
    table = GEMM_TILES[kernel_name][(4 if dtype == torch.float32 else 2, block_m)]
    return [tile for tile in table if arch in tile.archs]


def device_arch(device: torch.device) -> int:
    """The GEMM_TILES arch of a CUDA device; cards other than sm_9x and sm_10x take sm_80's configs."""
    major, _ = torch.cuda.get_device_capability(device)
    return {9: 90, 10: 100}.get(major, 80)


# The interpreter would time every config; it runs one small tile (several steps of every loop).
_INTERPRET_GEMM_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 32}
_INTERPRET_WEIGHT_GRAD_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}
_GEMM_BLOCKS = _INTERPRET_GEMM_BLOCKS if INTERPRET else {}
_WEIGHT_GRAD_BLOCKS = _INTERPRET_WEIGHT_GRAD_BLOCKS if INTERPRET else {}


# Below this many tokens a layer is bound by reading the expert weights (decoding, small batches)
# and the tile shape barely matters: the last config of each list is used without a search.
SEARCH_FROM_TOKENS = 1024


def _autotuned(*key: str):
    """Autotune over the kernel's GEMM_TILES keyed on `key`, except in the interpreter."""

    def wrap(kernel):
        if INTERPRET:
            return kernel
        name = kernel.__name__
        configs = list(dict.fromkeys(tile.config for tiles in GEMM_TILES[name].values() for tile in tiles))

        def prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            operand = next(value for value in args.values() if isinstance(value, torch.Tensor))
            tiles = gemm_tiles(name, operand.dtype, args.get("BLOCK_M"), device_arch(operand.device))
            tiles = tiles if args["N_BUCKET"] >= SEARCH_FROM_TOKENS else tiles[-1:]
            return [tile.config for tile in tiles]

        return triton.autotune(configs=configs, key=list(key), prune_configs_by={"early_config_prune": prune},
                               do_bench=_benchmark)(kernel)

    return wrap


def _benchmark(kernel_call, quantiles):
    """The active driver's benchmarker, looked up at the first search: Triton before 3.4 looks it up
    when a kernel is decorated, which fails on a machine without a GPU (gspo_kernels.compile_check)."""
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


# ---------------------------------------------------------------------------------------------
# Routing


@triton.jit
def _route_topk_kernel(
    logits_ptr, weights_ptr, idx_ptr, forced_ptr,
    N, E, stride_ln,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    NORMALIZE: tl.constexpr, FORCED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    slots = tl.arange(0, K_PAD)
    row_ok = rows < N
    valid = row_ok[:, None] & (experts[None, :] < E)
    logits = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_ln + experts[None, :], mask=valid, other=-float("inf")
    ).to(tl.float32)
    # Rows past N hold only -inf: shift and normalise them by harmless values instead of NaN.
    row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
    exp_logits = tl.exp(logits - row_max[:, None])
    total = tl.where(row_ok, tl.sum(exp_logits, axis=1), 1.0)
    probs = exp_logits / total[:, None]

    chosen_weight = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    chosen_expert = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    taken = (experts[None, :] >= E) | (rows[:, None] < 0)  # [BLOCK_T, E_PAD]; padding experts never win
    for slot in tl.static_range(TOP_K):
        if FORCED:
            pick = tl.load(forced_ptr + rows * TOP_K + slot, mask=row_ok, other=0).to(tl.int32)
        else:
            score = tl.where(taken, -float("inf"), logits)
            best = tl.max(score, axis=1)
            tied = (score == best[:, None]) & (taken == 0)  # not ~taken: Triton 3.3's interpreter cannot invert bools
            pick = tl.min(tl.where(tied, experts[None, :], E_PAD), axis=1)
            taken = taken | (experts[None, :] == pick[:, None])
        weight = tl.sum(tl.where(experts[None, :] == pick[:, None], probs, 0.0), axis=1)
        chosen_weight = tl.where(slots[None, :] == slot, weight[:, None], chosen_weight)
        chosen_expert = tl.where(slots[None, :] == slot, pick[:, None], chosen_expert)
    if NORMALIZE:
        norm = tl.where(row_ok, tl.sum(chosen_weight, axis=1), 1.0)
        chosen_weight = chosen_weight / norm[:, None]
    out = rows[:, None] * TOP_K + slots[None, :]
    out_ok = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, chosen_weight, mask=out_ok)
    tl.store(idx_ptr + out, chosen_expert.to(tl.int64), mask=out_ok)


def experts_pad(num_experts: int) -> int:
    """E_PAD: the experts padded to a power of two, the width of every per-expert block."""
    return triton.next_power_of_2(num_experts)


def route_blocks(num_experts: int, top_k: int) -> dict:
    """The routing kernel's block sizes: [BLOCK_T, E_PAD] logits per program, at most 4096."""
    pad = experts_pad(num_experts)
    return dict(TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=pad, BLOCK_T=max(1, min(64, 4096 // pad)))


def route_topk(router_logits, top_k, norm_topk_prob, forced_experts):
    """topk_weights [N, k] fp32 and topk_idx [N, k] int64 from one kernel launch."""
    tokens, num_experts = router_logits.shape
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights = allocate_output(tokens, top_k, dtype=torch.float32, device=logits.device)
    idx = allocate_output(tokens, top_k, dtype=torch.int64, device=logits.device)
    # Indices of any integer dtype, weights of any float dtype: the kernels read int64 and fp32 only.
    forced = forced_experts.to(torch.int64).contiguous() if forced_experts is not None else idx
    blocks = route_blocks(num_experts, top_k)
    _route_topk_kernel[(triton.cdiv(tokens, blocks["BLOCK_T"]),)](
        logits, weights, idx, forced, tokens, num_experts, logits.stride(0),
        **blocks, NORMALIZE=bool(norm_topk_prob), FORCED=forced_experts is not None,
    )
    return weights, idx


# ---------------------------------------------------------------------------------------------
# Permutation


@triton.jit
def _count_experts_kernel(idx_ptr, block_counts_ptr, S, E, BLOCK_P: tl.constexpr, E_PAD: tl.constexpr):
    """block_counts[b, e] = pairs of block b routed to expert e."""
    block = tl.program_id(0)
    pairs = block * BLOCK_P + tl.arange(0, BLOCK_P)
    expert = tl.load(idx_ptr + pairs, mask=pairs < S, other=E_PAD).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    hits = (expert[:, None] == experts[None, :]).to(tl.int32)
    tl.store(block_counts_ptr + block * E + experts, tl.sum(hits, axis=0), mask=experts < E)


@triton.jit
def _place_pairs_kernel(idx_ptr, block_base_ptr, sorted_pair_ptr, S, E, BLOCK_P: tl.constexpr):
    """sorted_pair[block_base[b, e] + rank] = pair, rank = earlier pairs of the block with the same expert."""
    block = tl.program_id(0)
    offs = tl.arange(0, BLOCK_P)
    pairs = block * BLOCK_P + offs
    ok = pairs < S
    expert = tl.load(idx_ptr + pairs, mask=ok, other=-1).to(tl.int32)
    earlier_same = (expert[:, None] == expert[None, :]) & (offs[None, :] < offs[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    base = tl.load(block_base_ptr + block * E + expert, mask=ok, other=0)
    tl.store(sorted_pair_ptr + base + rank, pairs, mask=ok)


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int) -> ExpertOrder:
    """The (token, slot) pairs sorted stably by expert: two kernel launches and a small cumsum."""
    flat = topk_idx.reshape(-1).to(torch.int64).contiguous()
    pairs = flat.numel()
    blocks = triton.cdiv(pairs, PAIR_BLOCK)
    device = flat.device
    block_counts = allocate_output(blocks, num_experts, dtype=torch.int32, device=device)
    _count_experts_kernel[(blocks,)](
        flat, block_counts, pairs, num_experts, BLOCK_P=PAIR_BLOCK, E_PAD=experts_pad(num_experts)
    )
    counts = block_counts.sum(dim=0, dtype=torch.int32)
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    block_base = starts[None, :] + torch.cumsum(block_counts, 0, dtype=torch.int32) - block_counts
    sorted_pair = allocate_output(pairs, dtype=torch.int32, device=device)
    _place_pairs_kernel[(blocks,)](flat, block_base, sorted_pair, pairs, num_experts, BLOCK_P=PAIR_BLOCK)
    return ExpertOrder(sorted_pair, counts, starts, topk_idx.shape[1])


# ---------------------------------------------------------------------------------------------
# Grouped GEMMs


BLOCK_ROWS = (16, 32, 64, 128)


def block_rows(pairs: int, num_experts: int) -> int:
    """BLOCK_M of the row-tile GEMMs: about the rows an expert receives on average, one of BLOCK_ROWS."""
    per_expert = pairs / num_experts
    return next((block for block in BLOCK_ROWS if per_expert <= block), BLOCK_ROWS[-1])


@triton.jit
def _tile_table_kernel(
    counts_ptr, starts_ptr, tiles_ptr, T, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr
):
    """tiles[:, t] = (expert, first sorted row, end row) of tile t, for BLOCK_T tiles per program."""
    tile = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    starts = tl.load(starts_ptr + experts, mask=experts < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    # Past the last tile every tile_end is <= t: the clamp puts it after the last expert's rows.
    expert = tl.minimum(tl.sum((tile_end[None, :] <= tile[:, None]).to(tl.int32), axis=1), E - 1)
    this = experts[None, :] == expert[:, None]
    first_tile = tl.sum(tl.where(this, (tile_end - tiles)[None, :], 0), axis=1)
    start = tl.sum(tl.where(this, starts[None, :], 0), axis=1)
    end = start + tl.sum(tl.where(this, counts[None, :], 0), axis=1)
    ok = tile < T
    tl.store(tiles_ptr + tile, expert, mask=ok)
    tl.store(tiles_ptr + T + tile, start + (tile - first_tile) * BLOCK_M, mask=ok)
    tl.store(tiles_ptr + 2 * T + tile, end, mask=ok)


def tile_table_blocks(num_experts: int) -> dict:
    """The tile table kernel's block sizes: [BLOCK_T, E_PAD] per program, at most 4096."""
    pad = experts_pad(num_experts)
    return dict(E_PAD=pad, BLOCK_T=max(1, 4096 // pad))


def tile_table(order: ExpertOrder, block_m: int) -> torch.Tensor:
    """[3, T] int32: expert, first sorted row and end row of every BLOCK_M tile of every expert.

    T = pairs // block_m + min(E, pairs) bounds the number of tiles whatever the counts, so the
    grid is known without waiting for them; tiles past the last one get an empty row range.
    """
    num_experts, pairs = order.counts.numel(), order.sorted_pair.numel()
    num_tiles = pairs // block_m + min(num_experts, pairs)
    tiles = allocate_output(3, num_tiles, dtype=torch.int32, device=order.counts.device)
    blocks = tile_table_blocks(num_experts)
    _tile_table_kernel[(triton.cdiv(num_tiles, blocks["BLOCK_T"]),)](
        order.counts, order.starts, tiles, num_tiles, num_experts, BLOCK_M=block_m, **blocks
    )
    return tiles


@triton.jit
def _tile(tiles_ptr, T):
    """(expert, first sorted row, end row) of this program's tile."""
    tile = tl.program_id(0)
    return tl.load(tiles_ptr + tile), tl.load(tiles_ptr + T + tile), tl.load(tiles_ptr + 2 * T + tile)


@triton.jit
def _tile_rows(sorted_pair_ptr, first_row, end_row, BLOCK_M: tl.constexpr):
    """This tile's BLOCK_M sorted rows, which of them are real, and the pair at each.

    Kernels call it once they have returned on an empty tile, so an empty tile reads nothing.
    """
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < end_row
    return rows, row_ok, tl.load(sorted_pair_ptr + rows, mask=row_ok, other=0)


@triton.jit
def _sorted_row(ptr, row, row_length):
    """A pointer to sorted row `row` of a [S, row_length] tensor, computed in 64 bits."""
    return ptr + row.to(tl.int64) * row_length


@triton.jit
def _row_offsets(BLOCK_M: tl.constexpr, row_length, cols):
    """[BLOCK_M, len(cols)] offsets of a tile's elements from its first row, in 32 bits.

    A tile's sorted rows are consecutive, so one 64-bit pointer to the first (`_sorted_row`) and
    32-bit offsets address it: 64-bit offsets for every element would double the registers the
    epilogues hold and make them spill.
    """
    return tl.arange(0, BLOCK_M)[:, None] * row_length + cols[None, :]


@triton.jit
def _rows_times_expert(a_rows, stride_ak, w_cols, stride_wk, K, row_ok, col_ok, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = A[:, :K] @ W[:K, :]; a_rows / w_cols point at each row of A / column of W."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@_autotuned("N_BUCKET", "E", "H", "I", "BLOCK_M")
@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, sorted_pair_ptr, tiles_ptr, h_ptr, gate_up_ptr,
    H, I, E, T, TOP_K, N_BUCKET,
    stride_xn, stride_xh, stride_we, stride_wo, stride_wh,
    STORE_GATE_UP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert, first_row, end_row = _tile(tiles_ptr, T)
    if first_row >= end_row:
        return
    rows, row_ok, pair = _tile_rows(sorted_pair_ptr, first_row, end_row, BLOCK_M)
    token = pair // TOP_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + token[:, None].to(tl.int64) * stride_xn
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    gate_cols = w_expert + cols[None, :].to(tl.int64) * stride_wo
    up_cols = w_expert + (cols[None, :] + I).to(tl.int64) * stride_wo
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        a = tl.load(x_rows + k[None, :] * stride_xh, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        gate_w = tl.load(gate_cols + k[:, None] * stride_wh, mask=w_mask, other=0.0)
        up_w = tl.load(up_cols + k[:, None] * stride_wh, mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, gate_w, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, up_w, acc_up, input_precision=DOT_PRECISION)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ok = row_ok[:, None] & col_ok[None, :]
    h_offsets = _row_offsets(BLOCK_M, I, cols)
    tl.store(_sorted_row(h_ptr, first_row, I) + h_offsets, h.to(h_ptr.dtype.element_ty), mask=out_ok)
    if STORE_GATE_UP:
        gate_up_tile = _sorted_row(gate_up_ptr, first_row, 2 * I) + _row_offsets(BLOCK_M, 2 * I, cols)
        tl.store(gate_up_tile, acc_gate.to(gate_up_ptr.dtype.element_ty), mask=out_ok)
        tl.store(gate_up_tile + I, acc_up.to(gate_up_ptr.dtype.element_ty), mask=out_ok)


@_autotuned("N_BUCKET", "E", "H", "I", "K", "BLOCK_M")
@triton.jit
def _scatter_matmul_kernel(
    a_ptr, w_ptr, sorted_pair_ptr, tiles_ptr, scale_ptr, out_ptr,
    H, I, E, T, K, N_BUCKET,
    stride_as, stride_ak, stride_we, stride_wk, stride_wh,
    HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[pair(s), :H] = scale[pair(s)] * (a[s, :K] @ W_e[:K, :H]) for the sorted rows s of expert e."""
    expert, first_row, end_row = _tile(tiles_ptr, T)
    if first_row >= end_row:
        return
    rows, row_ok, pair = _tile_rows(sorted_pair_ptr, first_row, end_row, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    a_rows = a_ptr + rows[:, None].to(tl.int64) * stride_as
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wh
    acc = _rows_times_expert(a_rows, stride_ak, w_cols, stride_wk, K, row_ok, col_ok, DOT_PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pair[:, None].to(tl.int64) * H + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@_autotuned("N_BUCKET", "E", "H", "I", "BLOCK_M")
@triton.jit
def _swiglu_grad_kernel(
    dy_ptr, w_ptr, sorted_pair_ptr, tiles_ptr, weights_ptr, gate_up_ptr,
    d_gate_up_ptr, h_ptr, d_weight_ptr,
    H, I, E, T, TOP_K, N_BUCKET, N_GROUPS,
    stride_dyn, stride_dyh, stride_we, stride_wh, stride_wi,
    DOT_PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert, first_row, end_row = _tile(tiles_ptr, T)
    if first_row >= end_row:
        return
    rows, row_ok, pair = _tile_rows(sorted_pair_ptr, first_row, end_row, BLOCK_M)
    token = pair // TOP_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    dy_rows = dy_ptr + token[:, None].to(tl.int64) * stride_dyn
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wi
    # k * stride_wh in 64 bits, so offsets into w_down's rows cannot overflow int32.
    grad_h = _rows_times_expert(dy_rows, stride_dyh, w_cols, tl.cast(stride_wh, tl.int64), H, row_ok, col_ok,
                                DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    gate_up_offsets = _row_offsets(BLOCK_M, 2 * I, cols)
    gate_up_tile = _sorted_row(gate_up_ptr, first_row, 2 * I)
    gate = tl.load(gate_up_tile + gate_up_offsets, mask=tile_ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_tile + gate_up_offsets + I, mask=tile_ok, other=0.0).to(tl.float32)
    # Everything that needs only the pre-activations first, then grad_h once per product.
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = silu * up
    h_offsets = _row_offsets(BLOCK_M, I, cols)
    tl.store(_sorted_row(h_ptr, first_row, I) + h_offsets, h.to(h_ptr.dtype.element_ty), mask=tile_ok)
    d_silu_up = up * sig * (1.0 + gate * (1.0 - sig))

    groups = tl.program_id(1) * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
    partial = tl.sum(tl.reshape(grad_h * h, [BLOCK_M, BLOCK_N // GROUP, GROUP]), axis=2)
    tl.store(
        d_weight_ptr + pair[:, None].to(tl.int64) * N_GROUPS + groups[None, :], partial,
        mask=row_ok[:, None] & (groups[None, :] < N_GROUPS),
    )

    grad_h = grad_h * tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dtype = d_gate_up_ptr.dtype.element_ty
    d_gate_up_tile = _sorted_row(d_gate_up_ptr, first_row, 2 * I)
    tl.store(d_gate_up_tile + gate_up_offsets, (grad_h * d_silu_up).to(dtype), mask=tile_ok)
    tl.store(d_gate_up_tile + gate_up_offsets + I, (grad_h * silu).to(dtype), mask=tile_ok)


@_autotuned("N_BUCKET", "E", "M", "N")
@triton.jit
def _expert_weight_grad_kernel(
    a_ptr, b_ptr, sorted_pair_ptr, counts_ptr, starts_ptr, scale_ptr, out_ptr,
    M, N, E, TOP_K, N_BUCKET,
    stride_as, stride_am, stride_bs, stride_bn, stride_oe, stride_om, stride_on,
    A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[e] = sum over the sorted rows s of expert e of (scale[pair] * a[row_a])^T b[row_b].

    row_a / row_b is the sorted row s itself or, BY_TOKEN, the token of the pair at row s.
    """
    expert = tl.program_id(0)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    start = tl.load(starts_ptr + expert)
    end = start + tl.load(counts_ptr + expert)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_K):
        rows = s0 + tl.arange(0, BLOCK_K)
        rows_ok = rows < end
        pair = tl.load(sorted_pair_ptr + rows, mask=rows_ok, other=0)
        a_rows = pair // TOP_K if A_BY_TOKEN else rows
        b_rows = pair // TOP_K if B_BY_TOKEN else rows
        a = tl.load(
            a_ptr + a_rows[None, :].to(tl.int64) * stride_as + ms[:, None] * stride_am,
            mask=m_ok[:, None] & rows_ok[None, :], other=0.0,
        )
        if HAS_SCALE:
            scale = tl.load(scale_ptr + pair, mask=rows_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(
            b_ptr + b_rows[:, None].to(tl.int64) * stride_bs + ns[None, :] * stride_bn,
            mask=rows_ok[:, None] & n_ok[None, :], other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out = out_ptr + expert.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers


def _sum_slots_in_pair_order(per_pair: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N*k, H] in pair order -> [N, H]: a fixed-order sum over the k slots of each token."""
    return per_pair.view(-1, top_k, per_pair.shape[1]).sum(dim=1)


class _Launch:
    """What every row-tile GEMM launch of one call shares: the tile table, its BLOCK_M, the tuning key."""

    def __init__(self, x: torch.Tensor, w_gate_up: torch.Tensor, order: ExpertOrder):
        self.tokens, self.hidden = x.shape
        self.num_experts, self.intermediate = w_gate_up.shape[0], w_gate_up.shape[1] // 2
        self.pairs = order.sorted_pair.numel()
        self.block_m = block_rows(self.pairs, self.num_experts)
        self.tiles = tile_table(order, self.block_m)
        self.bucket = triton.next_power_of_2(self.tokens)
        self.precision = dot_precision(x.dtype)

    def grid(self, columns: int):
        num_tiles = self.tiles.shape[1]
        return lambda meta: (num_tiles, triton.cdiv(columns, meta["BLOCK_N"]))


def experts_forward(x, topk_weights, w_gate_up, w_down, order: ExpertOrder, keep_gate_up: bool):
    """y [N, H] and, when keep_gate_up, the pre-activations [S, 2I] backward needs."""
    run = _Launch(x, w_gate_up, order)
    h = allocate_output(run.pairs, run.intermediate, dtype=x.dtype, device=x.device)
    gate_up = allocate_output(run.pairs, 2 * run.intermediate, dtype=x.dtype, device=x.device) if keep_gate_up else h
    _gate_up_kernel[run.grid(run.intermediate)](
        x, w_gate_up, order.sorted_pair, run.tiles, h, gate_up,
        run.hidden, run.intermediate, run.num_experts, run.tiles.shape[1], order.top_k, run.bucket,
        x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2),
        STORE_GATE_UP=keep_gate_up, DOT_PRECISION=run.precision, BLOCK_M=run.block_m, **_GEMM_BLOCKS,
    )
    per_pair = allocate_output(run.pairs, run.hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _scatter_matmul_kernel[run.grid(run.hidden)](
        h, w_down, order.sorted_pair, run.tiles, weights, per_pair,
        run.hidden, run.intermediate, run.num_experts, run.tiles.shape[1], run.intermediate, run.bucket,
        h.stride(0), h.stride(1), w_down.stride(0), w_down.stride(2), w_down.stride(1),
        HAS_SCALE=True, DOT_PRECISION=run.precision, BLOCK_M=run.block_m, **_GEMM_BLOCKS,
    )
    return _sum_slots_in_pair_order(per_pair, order.top_k), (gate_up if keep_gate_up else None)


def _weight_grad(run: _Launch, order: ExpertOrder, a, a_by_token, b, b_by_token, scale, out):
    """out [E, M, N] = per expert sum over its rows of (scale * a)^T b, one launch."""
    num_experts, rows_m, cols_n = out.shape

    def grid(meta):
        return num_experts, triton.cdiv(rows_m, meta["BLOCK_M"]), triton.cdiv(cols_n, meta["BLOCK_N"])

    _expert_weight_grad_kernel[grid](
        a, b, order.sorted_pair, order.counts, order.starts, scale if scale is not None else a, out,
        rows_m, cols_n, num_experts, order.top_k, run.bucket,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, HAS_SCALE=scale is not None, DOT_PRECISION=run.precision,
        **_WEIGHT_GRAD_BLOCKS,
    )
    return out


def experts_backward(grad_y, x, topk_weights, w_gate_up, w_down, order: ExpertOrder, gate_up, needs_grad):
    """(dx, d topk_weights, d w_gate_up, d w_down), None where needs_grad is False."""
    run = _Launch(x, w_gate_up, order)
    grad_y = grad_y.to(x.dtype)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    n_groups = triton.cdiv(run.intermediate, GROUP)

    d_gate_up = allocate_output(run.pairs, 2 * run.intermediate, dtype=x.dtype, device=x.device)
    h = allocate_output(run.pairs, run.intermediate, dtype=x.dtype, device=x.device)
    d_weight_parts = allocate_output(run.pairs, n_groups, dtype=torch.float32, device=x.device)
    _swiglu_grad_kernel[run.grid(run.intermediate)](
        grad_y, w_down, order.sorted_pair, run.tiles, weights, gate_up,
        d_gate_up, h, d_weight_parts,
        run.hidden, run.intermediate, run.num_experts, run.tiles.shape[1], order.top_k, run.bucket, n_groups,
        grad_y.stride(0), grad_y.stride(1), w_down.stride(0), w_down.stride(1), w_down.stride(2),
        DOT_PRECISION=run.precision, GROUP=GROUP, BLOCK_M=run.block_m, **_GEMM_BLOCKS,
    )
    grad_weights = None
    if needs_grad[1]:
        grad_weights = d_weight_parts.sum(dim=1).view(topk_weights.shape).to(topk_weights.dtype)

    grad_x = None
    if needs_grad[0]:
        per_pair = allocate_output(run.pairs, run.hidden, dtype=x.dtype, device=x.device)
        _scatter_matmul_kernel[run.grid(run.hidden)](
            d_gate_up, w_gate_up, order.sorted_pair, run.tiles, weights, per_pair,
            run.hidden, run.intermediate, run.num_experts, run.tiles.shape[1], 2 * run.intermediate, run.bucket,
            d_gate_up.stride(0), d_gate_up.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2),
            HAS_SCALE=False, DOT_PRECISION=run.precision, BLOCK_M=run.block_m, **_GEMM_BLOCKS,
        )
        grad_x = _sum_slots_in_pair_order(per_pair, order.top_k)
    grad_w_gate_up = None
    if needs_grad[2]:
        out = allocate_output(w_gate_up.shape, dtype=w_gate_up.dtype, device=x.device)
        grad_w_gate_up = _weight_grad(run, order, d_gate_up, False, x, True, None, out)
    grad_w_down = None
    if needs_grad[3]:
        out = allocate_output(w_down.shape, dtype=w_down.dtype, device=x.device)
        grad_w_down = _weight_grad(run, order, grad_y, True, h, False, weights, out)
    return grad_x, grad_weights, grad_w_gate_up, grad_w_down
