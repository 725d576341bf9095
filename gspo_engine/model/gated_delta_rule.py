"""The gated delta rule of Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464) in PyTorch.

Per value head, a key-by-value state S [K, V] (zero at a sequence start, or a given state) is read
and written token by token:

    a_t = exp(g_t)                                  decay, g_t <= 0
    u_t = beta_t * (v_t - a_t S_{t-1}^T k_t)        the part of v_t the decayed state does not predict
    S_t = a_t S_{t-1} + k_t u_t^T
    o_t = scale * S_t^T q_t

`chunk_gated_delta_rule` computes it C tokens at a time (the chunked form of the paper, section 3):
inside a chunk, with G_i = exp(g_1 + ... + g_i) and S_0 the state entering it,

    (I + A) U = beta V - diag(beta G) K S_0,        A_ij = beta_i (G_i / G_j) k_i.k_j  for j < i
    O = diag(G) Q S_0 + ((Q K^T) * (G_i / G_j), lower triangle with diagonal) U
    S_C = G_C S_0 + sum_j (G_C / G_j) k_j u_j^T

so the work is a few [C, C] and [C, K] matmuls per chunk plus one sequential pass over the chunks;
autograd differentiates it exactly. `recurrent_gated_delta_rule` walks the tokens one by one: the
decode step. Both compute in fp32 (fp64 inputs stay fp64) and return the output in the input dtype
and the state in the compute dtype.

Shapes follow flash-linear-attention's API, which `gated_delta_rule` calls on CUDA: q, k [B, T, H, K],
v [B, T, HV, V], g, beta [B, T, HV], states [N, HV, K, V]. With HV > H each key head serves HV / H
consecutive value heads. With cu_seqlens (int [N + 1], B == 1) the row holds N sequences one after
the other: each starts from its own initial state (or zero) and has its own final state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gspo_engine.model import fla_backend
from gspo_engine.model.fla_backend import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

DEFAULT_CHUNK_SIZE = 64
L2NORM_EPS = 1e-6  # what transformers' and flash-linear-attention's l2norm add under the square root


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension, in x's dtype."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked rule on the inputs' device: flash-linear-attention's kernels on CUDA, ours elsewhere
    (and on CUDA where fla would refuse the backward a training call needs: fla_backend.use_for).

    backend "fla" or "torch" forces one (tests compare them on the same CUDA inputs).
    """
    if backend is None:
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, g, beta, initial_state) if t is not None)
        backend = "fla" if q.is_cuda and fla_backend.use_for(needs_grad) else "torch"
    if backend == "fla":
        return fla_chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, qk_l2norm=qk_l2norm,
        )
    if backend != "torch":
        raise ValueError(f"backend must be 'fla' or 'torch', got {backend!r}")
    return chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, qk_l2norm=qk_l2norm,
    )


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    qk_l2norm: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output [B, T, HV, V] in q's dtype and, with output_final_state, the states [N, HV, K, V]."""
    batch, seq, heads, v_heads, num_states = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_rows, k_rows, v_rows, g_rows, beta_rows, lengths = _rows(q, k, v, g, beta, cu_seqlens, qk_l2norm, v_heads // heads)
    state = _initial_state(initial_state, num_states, q_rows, v_rows)
    out, state = _chunked(q_rows * scale, k_rows, v_rows, g_rows, beta_rows, state, chunk_size)
    return _unrows(out, lengths, batch, seq, q.dtype), state if output_final_state else None


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same rule token by token (decode steps, T == 1); same arguments and results as the chunked one."""
    batch, seq, heads, v_heads, num_states = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_rows, k_rows, v_rows, g_rows, beta_rows, lengths = _rows(q, k, v, g, beta, cu_seqlens, qk_l2norm, v_heads // heads)
    state = _initial_state(initial_state, num_states, q_rows, v_rows)
    outputs = []
    for t in range(q_rows.shape[2]):
        state = state * g_rows[:, :, t].exp()[..., None, None]
        k_t = k_rows[:, :, t]
        u_t = beta_rows[:, :, t, None] * (v_rows[:, :, t] - (state * k_t[..., None]).sum(-2))
        state = state + k_t[..., None] * u_t[..., None, :]
        outputs.append((state * q_rows[:, :, t, :, None]).sum(-2) * scale)
    out = torch.stack(outputs, dim=2)
    return _unrows(out, lengths, batch, seq, q.dtype), state if output_final_state else None


def _check(q, k, v, g, beta, initial_state, cu_seqlens) -> tuple[int, int, int, int, int]:
    """batch, seq, key heads, value heads and the number of sequences; ValueError naming the argument."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, T, H, K] of one shape, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    batch, seq, heads, _ = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B, T, HV, V] with q's B and T, got {tuple(v.shape)} for q {tuple(q.shape)}")
    v_heads = v.shape[2]
    if v_heads % heads:
        raise ValueError(f"the value heads ({v_heads}) must be a multiple of the key heads ({heads})")
    for name, tensor in (("g", g), ("beta", beta)):
        if tensor.shape != v.shape[:3]:
            raise ValueError(f"{name} must be [B, T, HV] = {tuple(v.shape[:3])}, got {tuple(tensor.shape)}")
    num_states = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs the sequences packed in one row (B == 1), got B = {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be [N + 1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
        num_states = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (num_states, v_heads, q.shape[-1], v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [N, HV, K, V] = {expected}, got {tuple(initial_state.shape)}")
    return batch, seq, heads, v_heads, num_states


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows(q, k, v, g, beta, cu_seqlens, qk_l2norm: bool, groups: int):
    """The inputs as independent rows [R, HV, L, D] in the compute dtype, and the sequence lengths when packed.

    A packed row is cut into its sequences, each right-padded to the longest: a padding position has
    k = 0, beta = 0 and g = 0, so it leaves the state as it is and each row ends in its sequence's
    final state.
    """
    dtype = _compute_dtype(q.dtype)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    lengths = None
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != q.shape[1] or any(b > a for a, b in zip(bounds[1:], bounds)):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {q.shape[1]}, got {bounds}")
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        index, valid = _padded_index(bounds, lengths, q.device)
        q, k, v, g, beta = (x[0][index] * valid.view(*valid.shape, *[1] * (x.dim() - 2)) for x in (q, k, v, g, beta))
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    g, beta = g.transpose(1, 2), beta.transpose(1, 2)
    return q, k, v, g, beta, lengths


def _padded_index(bounds: list[int], lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """index [N, L] into the packed row (clamped) and valid [N, L], L the longest sequence (at least 1)."""
    longest = max(max(lengths), 1)
    offsets = torch.arange(longest, device=device)
    starts = torch.tensor(bounds[:-1], device=device)
    valid = offsets[None, :] < torch.tensor(lengths, device=device)[:, None]
    index = (starts[:, None] + offsets[None, :]).clamp(max=max(bounds[-1] - 1, 0))
    return index, valid


def _unrows(out: torch.Tensor, lengths: list[int] | None, batch: int, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """[R, HV, L, V] back to [B, T, HV, V] in `dtype` (a packed row: the valid positions, in order)."""
    out = out.transpose(1, 2)
    if lengths is not None:
        valid = torch.arange(out.shape[1], device=out.device)[None, :] < torch.tensor(lengths, device=out.device)[:, None]
        out = out[valid][None]
    return out[:, :seq].to(dtype)


def _initial_state(initial_state, num_states: int, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if initial_state is None:
        return q.new_zeros(num_states, v.shape[1], q.shape[-1], v.shape[-1])
    return initial_state.to(q.dtype)


def _chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (already scaled), k [R, H, L, K], v [R, H, L, V], g, beta [R, H, L], state [R, H, K, V]."""
    rows, heads, length, _ = k.shape
    size = min(chunk_size, max(length, 1))
    pad = (-length) % size
    if pad:
        # Padding positions (k = 0, beta = 0, g = 0) leave the state as it is.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    chunks = (length + pad) // size
    q, k, v = (x.reshape(rows, heads, chunks, size, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(rows, heads, chunks, size), beta.reshape(rows, heads, chunks, size)

    log_decay = g.cumsum(-1)  # log G_i: the decay from the chunk's start through position i
    lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    strictly_lower = lower.tril(-1)
    # G_i / G_j for j <= i; the upper triangle is masked before exp, where it could overflow.
    pair_decay = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    system = (beta[..., None] * (k @ k.transpose(-1, -2)) * pair_decay).masked_fill(~strictly_lower, 0.0)
    system = system + torch.eye(size, dtype=q.dtype, device=q.device)
    # U = U_in - W S_0: the new values of the chunk before (U_in) and as read from the entering state (W),
    # both from one triangular solve.
    right = torch.cat((v * beta[..., None], k * (beta * log_decay.exp())[..., None]), dim=-1)
    u_in, w = torch.linalg.solve_triangular(system, right, upper=False, unitriangular=True).split(
        [v.shape[-1], k.shape[-1]], dim=-1
    )
    intra = (q @ k.transpose(-1, -2)) * pair_decay
    q_decayed = q * log_decay.exp()[..., None]
    k_to_end = k * (log_decay[..., -1:] - log_decay).exp()[..., None]
    chunk_decay = log_decay[..., -1].exp()[..., None, None]

    outputs = []
    for c in range(chunks):
        u = u_in[:, :, c] - w[:, :, c] @ state
        outputs.append(q_decayed[:, :, c] @ state + intra[:, :, c] @ u)
        state = state * chunk_decay[:, :, c] + k_to_end[:, :, c].transpose(-1, -2) @ u
    out = torch.stack(outputs, dim=2).reshape(rows, heads, chunks * size, -1)
    return out[:, :, :length], state
