"""lm_head -> token log-prob -> GSPO loss, without ever materializing the logits [B, T, V].

Public: `token_logprobs`, `fused_linear_gspo_loss`, and `LinearGSPOLoss`, a module with the call
signature of Liger-Kernel's `LigerFusedLinearGRPOLoss`.

With N tokens, hidden size H and vocabulary V, the lm_head forward + backward costs 6*N*H*V FLOPs
if the logits of a token survive from the forward until its loss gradient is known, 8*N*H*V if
they are recomputed. A token's GSPO gradient depends on its whole sequence (through s_i), so
surviving logits means the logits of whole sequences. Both strategies are here, chosen per chunk
of sequences under a memory budget, `chunk_budget_mib`, that does not depend on the batch size:

- keep (6NHV): `fused_linear_gspo_loss` walks the batch in chunks of whole sequences whose
  response tokens' logits fit the budget (accumulation dtype, fp32 for bf16 inputs; see
  `chunk_sequences`). For a chunk it computes the logits once, the log-probs, the chunk's GSPO
  gradient (the loss is a mean over non-empty sequences, so it is the gradient of the chunk's own
  gspo_loss times the chunk's share of them), turns the logits into d logits in place and forms
  d hidden, d weight and d bias right away, during the forward. The backward only scales them by
  d loss.
- recompute (8NHV): the sequences whose logits alone exceed the budget form one last chunk that
  streams tiles of rows x vocabulary (`stream_tile`) twice (gspo_kernels/fused_linear_stream.py): once
  with an online log-sum-exp for the log-probs, once, after the gradient is known, recomputing
  each tile to form d logits. `token_logprobs` always works this way (its downstream use is
  unknown, so it saves only the per-token log-sum-exp).

Only response tokens (mask != 0) are computed at all in `fused_linear_gspo_loss`; in
`token_logprobs`' backward, rows whose gradient is zero are skipped. Every matmul runs on the
tensor cores through cuBLAS; on CUDA a streamed tile's statistics and its d logits are Triton
kernels that read the tile once (gspo_kernels/fused_linear_triton.py). Which strategy the default
budget picks at which shape, and the extra memory of each: docs/fused_linear.md.
"""

from __future__ import annotations

import torch
from torch import nn

from gspo_kernels import reference
from gspo_kernels.backend import resolve_backend
from gspo_kernels.fused_linear_stream import (
    Grads,
    accumulation_dtype,
    dlogits_tile_torch,
    kept_grads,
    kept_logits,
    stream_stats_torch,
    stream_tile,
)
from gspo_kernels.fused_linear_stream import stream_grads as stream_grads_tiled
from gspo_kernels.loss import gspo_loss
from gspo_kernels.validation import holds_integers, value_range

# Logits kept at once by default, by device type. CPU: the logits of one 512-token sequence of
# Qwen3's vocabulary in fp32 (297 MiB), a fraction of what materialized logits cost. CUDA: none.
# On an H200, recomputing the logits in large cuBLAS tiles beat keeping them one sequence at a
# time (N = 8 x 1024, H = 4096, V = 151,936: 80 ms and 0.8 GiB against 128 ms and 3.7 GiB, whose
# d weight must sum in fp32 over the chunks); keeping pays only with budgets over 2 GiB.
DEFAULT_CHUNK_BUDGETS_MIB = {"cpu": 512, "cuda": 0}


# On CUDA the streamed tiles' matmuls run in cuBLAS and their epilogues in Triton, which read
# each logit once per pass where the PyTorch epilogue makes about eight passes (the estimate is in
# gspo_kernels/fused_linear_triton.py); use_backend("torch") forces the PyTorch epilogue.
CUDA_DEFAULT_BACKEND = "triton"


def default_chunk_budget_mib(device: torch.device) -> float:
    return DEFAULT_CHUNK_BUDGETS_MIB["cuda" if device.type == "cuda" else "cpu"]


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def validate_linear_inputs(hidden, weight, targets, bias, temperature) -> None:
    """Raise ValueError naming the argument and its shape for every input the lm_head cannot take."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {_shape(hidden)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be [V, H] with H = {hidden.shape[2]} (hidden {_shape(hidden)}), got shape {_shape(weight)}"
        )
    if targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"targets must be [B, T] = {_shape(hidden)[:2]} like hidden {_shape(hidden)}, got shape {_shape(targets)}"
        )
    if not holds_integers(targets):
        raise ValueError(f"targets must hold integer token ids, got {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"bias must be [V] = ({weight.shape[0]},) like weight {_shape(weight)}, got shape {_shape(bias)}"
        )
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    for name, tensor in (("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if targets.numel() > 0:
        low, high = value_range(targets)
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(
                f"targets must lie in [0, {weight.shape[0]}) (weight {_shape(weight)} has V = {weight.shape[0]}), "
                f"got ids from {low} to {high}"
            )


def _triton():
    from gspo_kernels import fused_linear_triton

    return fused_linear_triton


def stream_stats(backend, hidden_rows, weight, bias, targets, inv_temperature, with_entropy):
    """(logp, lse, entropy or None) [R] for hidden rows [R, H], streaming the vocabulary."""
    if backend == "triton" and hidden_rows.dtype != torch.float64:
        return _triton().logprob_stats(hidden_rows, weight, bias, targets, inv_temperature, with_entropy)
    dtype = accumulation_dtype(hidden_rows.dtype)
    num_rows = hidden_rows.shape[0]
    logp = torch.full((num_rows,), float("nan"), dtype=dtype, device=hidden_rows.device)
    lse, entropy = torch.full_like(logp, float("nan")), torch.full_like(logp, float("nan"))
    row_chunk, _ = stream_tile(hidden_rows.device)
    for r0 in range(0, num_rows, row_chunk):
        rows = slice(r0, min(r0 + row_chunk, num_rows))
        out = stream_stats_torch(hidden_rows[rows], weight, bias, targets[rows], inv_temperature, with_entropy)
        logp[rows], lse[rows] = out[0], out[1]
        if with_entropy:
            entropy[rows] = out[2]
    return logp, lse, entropy if with_entropy else None


def stream_grads(backend, hidden_rows, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                 inv_temperature, grads: Grads) -> None:
    """Accumulate into `grads` the gradients of rows [R, H], recomputing their logits tile by tile."""
    use_triton = backend == "triton" and hidden_rows.dtype != torch.float64
    tile_fn = _triton().dlogits_tile if use_triton else dlogits_tile_torch
    stream_grads_tiled(hidden_rows, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                       grads, tile_fn)


def _new_grads(num_rows, hidden, weight, bias, needs, weight_contributions: int) -> Grads:
    """Zeroed accumulators for the inputs in `needs` (hidden, weight, bias).

    d hidden and d bias accumulate in fp32 (fp64 for fp64 inputs). d weight does too when
    several chunks of sequences add to it; a single contribution is summed in fp32 one
    vocabulary chunk at a time (see fused_linear_stream.stream_grads) and lands in the weight's
    own dtype.
    """
    weight_dtype = weight.dtype if weight_contributions == 1 else accumulation_dtype(weight.dtype)
    hidden_shape = (num_rows, hidden.shape[-1])
    return Grads(
        hidden=hidden.new_zeros(hidden_shape, dtype=accumulation_dtype(hidden.dtype)) if needs[0] else None,
        weight=torch.zeros(weight.shape, dtype=weight_dtype, device=weight.device) if needs[1] else None,
        bias=torch.zeros(bias.shape, dtype=accumulation_dtype(bias.dtype), device=bias.device) if needs[2] else None,
    )


class _StreamedTokenLogprobs(torch.autograd.Function):
    """logp (and entropy) of hidden rows [N, H]; saves the per-row lse, recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden_rows, weight, bias, targets, inv_temperature, with_entropy, backend):
        logp, lse, entropy = stream_stats(backend, hidden_rows, weight, bias, targets, inv_temperature, with_entropy)
        ctx.save_for_backward(hidden_rows, weight, bias, targets, lse, entropy)
        ctx.config = (inv_temperature, backend)
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden_rows, weight, bias, targets, lse, entropy = ctx.saved_tensors
        inv_temperature, backend = ctx.config
        needs = ctx.needs_input_grad[:3]
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = grad_logp.to(lse.dtype)
        # Rows with a zero gradient (padding, prompt tokens) need no logits at all.
        active = grad_logp != 0
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(lse.dtype)
            active |= grad_entropy != 0
        rows = active.nonzero().squeeze(1)
        pick = (lambda t: None if t is None else t[rows])
        grads = _new_grads(rows.numel(), hidden_rows, weight, bias, needs, weight_contributions=1)
        stream_grads(backend, hidden_rows[rows], weight, bias, targets[rows], lse[rows], pick(entropy),
                     grad_logp[rows], pick(grad_entropy), inv_temperature, grads)
        grad_hidden = None
        if needs[0]:
            grad_hidden = hidden_rows.new_zeros(hidden_rows.shape)
            grad_hidden[rows] = grads.hidden.to(hidden_rows.dtype)
        grad_weight = grads.weight.to(weight.dtype) if needs[1] else None
        grad_bias = grads.bias.to(bias.dtype) if needs[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Log-prob of each target token under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [B, T, H] final normed hidden states at the positions that predict `targets`.
        weight: [V, H] lm_head weight (tied to the embedding or not).
        targets: [B, T] token ids in [0, V).
        bias: optional [V].
        temperature: the sampling temperature of the rollout.
        return_entropy: also return the entropy of each position's distribution.

    Returns:
        logps [B, T] (fp32; fp64 for fp64 inputs), differentiable with respect to hidden, weight
        and bias; with return_entropy, (logps, entropy [B, T]), both differentiable.
    """
    validate_linear_inputs(hidden, weight, targets, bias, temperature)
    backend = resolve_backend(hidden, cuda_default=CUDA_DEFAULT_BACKEND)
    if backend == "reference":
        return reference.token_logprobs_reference(
            hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=return_entropy
        )
    batch, steps, hidden_size = hidden.shape
    out = _StreamedTokenLogprobs.apply(
        hidden.reshape(batch * steps, hidden_size), weight, bias, targets.reshape(-1),
        1.0 / temperature, return_entropy, backend,
    )
    if return_entropy:
        return out[0].view(batch, steps), out[1].view(batch, steps)
    return out.view(batch, steps)


def chunk_sequences(lengths: list[int], vocab_size: int, element_bytes: int, budget_mib: float):
    """The non-empty sequences, given their response lengths, split into chunks (indices, keep).

    Kept chunks pack consecutive sequences while their response tokens' logits fit the budget;
    every sequence too long for it goes to one last chunk that is recomputed, so the streamed
    kernels see all of those rows at once.
    """
    capacity = int(budget_mib * 2**20) // (vocab_size * element_bytes)
    chunks, current, rows, recomputed = [], [], 0, []
    for index, length in enumerate(lengths):
        if length == 0:
            continue
        if length > capacity:
            recomputed.append(index)
            continue
        if rows + length > capacity:
            chunks.append((current, True))
            current, rows = [], 0
        current.append(index)
        rows += length
    if current:
        chunks.append((current, True))
    if recomputed:
        chunks.append((recomputed, False))
    return chunks


def _chunk_loss_gradient(logps, loss_inputs, loss_options, share):
    """d (share * gspo_loss of the chunk) / d logps [b, T] for one chunk of sequences."""
    old_logps, advantages, mask, ref_logps = loss_inputs
    with torch.enable_grad():
        leaf = logps.detach().requires_grad_()
        old = leaf.detach() if old_logps is None else old_logps
        loss, _ = gspo_loss(leaf, old, advantages, mask, ref_logps=ref_logps, **loss_options)
        (grad,) = torch.autograd.grad(loss * share, leaf)
    return grad


class _ChunkedGSPOLoss(torch.autograd.Function):
    """GSPO loss of the lm_head outputs; every gradient is formed in the forward, chunk by chunk of sequences."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old_logps, advantages, mask, ref_logps, config):
        inv_temperature, loss_options, budget_mib, backend = config
        batch, steps, hidden_size = hidden.shape
        hidden_rows, flat_targets = hidden.reshape(batch * steps, hidden_size), targets.reshape(-1)
        response = mask.reshape(batch, steps) != 0
        lengths = response.sum(dim=1).tolist()
        # The sequences the loss averages over; every chunk holds only non-empty ones.
        num_averaged = batch if loss_options["count_empty_sequences"] else sum(length > 0 for length in lengths)
        dtype = accumulation_dtype(hidden.dtype)
        # Non-response positions are never computed; gspo_loss ignores whatever they hold.
        logps = torch.zeros((batch, steps), dtype=dtype, device=hidden.device)
        needs = ctx.needs_input_grad[:3]
        element_bytes = torch.empty((), dtype=dtype).element_size()
        chunks = chunk_sequences(lengths, weight.shape[0], element_bytes, budget_mib)
        grads = _new_grads(batch * steps, hidden, weight, bias, needs, weight_contributions=len(chunks))
        kept_rows = max((sum(lengths[index] for index in sequences) for sequences, keep in chunks if keep), default=0)
        kept_buffer = torch.empty(kept_rows * weight.shape[0], dtype=dtype, device=hidden.device)
        for sequences, keep in chunks:
            sequences = torch.tensor(sequences, device=hidden.device)
            seq, step = response[sequences].nonzero(as_tuple=True)
            rows = sequences[seq] * steps + step
            chunk_hidden, chunk_targets = hidden_rows[rows], flat_targets[rows]
            if keep:
                tiles, logp, lse = kept_logits(chunk_hidden, weight, bias, chunk_targets, inv_temperature, kept_buffer)
            else:
                logp, lse, _ = stream_stats(backend, chunk_hidden, weight, bias, chunk_targets, inv_temperature, False)
            logps.view(-1)[rows] = logp.to(dtype)
            loss_inputs = tuple(None if t is None else t[sequences] for t in (old_logps, advantages, mask, ref_logps))
            grad = _chunk_loss_gradient(logps[sequences], loss_inputs, loss_options, len(sequences) / num_averaged)
            grad_logp = grad[seq, step].to(lse.dtype)
            chunk_grads = Grads(
                hidden=torch.zeros_like(chunk_hidden, dtype=grads.hidden.dtype) if needs[0] else None,
                weight=grads.weight, bias=grads.bias,
            )
            if keep:
                kept_grads(tiles, chunk_hidden, weight, chunk_targets, lse, grad_logp, inv_temperature, chunk_grads)
            else:
                stream_grads(backend, chunk_hidden, weight, bias, chunk_targets, lse, None, grad_logp, None,
                             inv_temperature, chunk_grads)
            if needs[0]:
                grads.hidden[rows] = chunk_grads.hidden
        del kept_buffer
        old = logps if old_logps is None else old_logps
        loss, _ = gspo_loss(logps, old, advantages, mask, ref_logps=ref_logps, **loss_options)
        ctx.grads = (
            grads.hidden.to(hidden.dtype).view(hidden.shape) if needs[0] else None,
            grads.weight.to(weight.dtype) if needs[1] else None,
            grads.bias.to(bias.dtype) if needs[2] else None,
        )
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, unused_grad_logps):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_linear_gspo_loss: backward ran twice; its gradients are formed once")
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return (*scaled, None, None, None, None, None, None)


def fused_linear_gspo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logps: torch.Tensor | None,
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
    chunk_budget_mib: float | None = None,
    kl_weighted_by_ratio: bool = False,
    count_empty_sequences: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`gspo_loss(token_logprobs(hidden, weight, targets, ...), old_logps, ...)` without the logits.

    Args are those of `token_logprobs` and `gspo_kernels.gspo_loss` (`kl_weighted_by_ratio` and
    `count_empty_sequences` are TRL's conventions, see there); `old_logps=None` means
    on-policy (old = current, detached: s_i = 1). `chunk_budget_mib` bounds the logits kept at
    once (see the module docstring; 0 recomputes them all; None: the device's default,
    `default_chunk_budget_mib`); it changes speed and memory, never the result.

    Returns:
        (loss, metrics) exactly as gspo_loss returns them; loss is differentiable with respect
        to hidden, weight and bias.
    """
    validate_linear_inputs(hidden, weight, targets, bias, temperature)
    if mask.shape != targets.shape:
        raise ValueError(f"mask must be [B, T] = {_shape(targets)} like targets, got shape {_shape(mask)}")
    if chunk_budget_mib is None:
        chunk_budget_mib = default_chunk_budget_mib(hidden.device)
    if not chunk_budget_mib >= 0:
        raise ValueError(f"chunk_budget_mib must be >= 0 (0 keeps no logits), got {chunk_budget_mib!r}")
    loss_options = {"level": level, "eps_low": eps_low, "eps_high": eps_high, "beta": beta,
                    "kl_weighted_by_ratio": kl_weighted_by_ratio, "count_empty_sequences": count_empty_sequences}
    backend = resolve_backend(hidden, cuda_default=CUDA_DEFAULT_BACKEND)
    if backend == "reference":
        logps = reference.token_logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature)
        old = logps.detach() if old_logps is None else old_logps
        return reference.gspo_loss_reference(logps, old, advantages, mask, ref_logps=ref_logps, **loss_options)
    differentiable = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    if not (torch.is_grad_enabled() and differentiable):
        logps = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
        old = logps if old_logps is None else old_logps
        return gspo_loss(logps, old, advantages, mask, ref_logps=ref_logps, **loss_options)
    config = (1.0 / temperature, loss_options, chunk_budget_mib, backend)
    loss, logps = _ChunkedGSPOLoss.apply(hidden, weight, bias, targets, old_logps, advantages, mask, ref_logps, config)
    with torch.no_grad():
        old = logps if old_logps is None else old_logps
        _, metrics = gspo_loss(logps, old, advantages, mask, ref_logps=ref_logps, **loss_options)
    return loss, metrics


class LinearGSPOLoss(nn.Module):
    """Drop-in for Liger's `LigerFusedLinearGRPOLoss` call: lm_head + GSPO loss, logits never stored.

    `forward(_input [B, T, H], lin_weight [V, H], selected_token_ids [B, T], attention_mask [B, T],
    advantages [B] or [B, T], bias=None, ref_per_token_logps=None, old_per_token_logps=None)`
    returns `(loss, metrics)`; `old_per_token_logps=None` means on-policy. `metrics` is laid out
    as Liger lays it out, because trainers index it (TRL's GRPOTrainer reads metrics[0] as the KL
    when beta != 0 and metrics[-1] as the clipped fraction): `[kl, clip_frac]` when beta != 0,
    else `[clip_frac]`. `fused_linear_gspo_loss` returns every metric by name.

    `kl_weighted_by_ratio=True, count_empty_sequences=True` give TRL GRPOTrainer's loss with its
    defaults (`use_bias_correction_kl=True`, `loss_type="grpo"`); see docs/fused_linear.md.
    """

    def __init__(self, level: str = "sequence", eps_low: float = 3e-4, eps_high: float = 4e-4, beta: float = 0.0,
                 temperature: float = 1.0, chunk_budget_mib: float | None = None, kl_weighted_by_ratio: bool = False,
                 count_empty_sequences: bool = False):
        super().__init__()
        self.level, self.eps_low, self.eps_high, self.beta = level, eps_low, eps_high, beta
        self.temperature, self.chunk_budget_mib = temperature, chunk_budget_mib
        self.kl_weighted_by_ratio, self.count_empty_sequences = kl_weighted_by_ratio, count_empty_sequences

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None):
        loss, metrics = fused_linear_gspo_loss(
            _input, lin_weight, selected_token_ids, old_per_token_logps, advantages, attention_mask,
            bias=bias, temperature=self.temperature, level=self.level, eps_low=self.eps_low,
            eps_high=self.eps_high, ref_logps=ref_per_token_logps if self.beta != 0.0 else None,
            beta=self.beta, chunk_budget_mib=self.chunk_budget_mib, kl_weighted_by_ratio=self.kl_weighted_by_ratio,
            count_empty_sequences=self.count_empty_sequences,
        )
        liger_layout = [metrics["kl"], metrics["clip_frac"]] if self.beta != 0.0 else [metrics["clip_frac"]]
        return loss, liger_layout

    def extra_repr(self) -> str:
        return (f"level={self.level!r}, eps_low={self.eps_low}, eps_high={self.eps_high}, beta={self.beta}, "
                f"temperature={self.temperature}, chunk_budget_mib={self.chunk_budget_mib}, "
                f"kl_weighted_by_ratio={self.kl_weighted_by_ratio}, count_empty_sequences={self.count_empty_sequences}")
