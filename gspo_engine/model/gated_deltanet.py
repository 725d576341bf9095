"""The Gated DeltaNet token mixer of Qwen3-Next and Qwen3.5 (the "linear_attention" layers), and its gated RMSNorm.

    q, k, v = silu(causal depthwise conv(in_proj(x)))    over the channels [q | k | v]
    beta = sigmoid(b),  g = -exp(A_log) * softplus(a + dt_bias)
    o = gated delta rule(l2norm(q), l2norm(k), v, g, beta)   (gated_delta_rule.py)
    out = out_proj(rmsnorm(o) * silu(z))                     per value head

Qwen3-Next projects q, k, v, z with one matrix `in_proj_qkvz` and b, a with `in_proj_ba`, both
grouped per key head ([q_h | k_h | v_h's | z_h's] for each key head h); Qwen3.5 has four separate
ones (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`). Both give the same tensors here, so
everything after the projections is shared.

Padding positions (token_mask 0) are zeroed before the projections, as transformers does, and
get beta = 0 and g = 0, which makes them leave the recurrent state exactly as it is: a left-padded
prompt starts from a zero state and zero convolution history, and a right-padded one ends in the
state of its last real token.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gspo_engine.model.args import ModelArgs
from gspo_engine.model.gated_delta_rule import gated_delta_rule, recurrent_gated_delta_rule
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.short_conv import causal_conv1d


class LinearAttentionState(Protocol):
    """What a generation cache gives one Gated DeltaNet layer: the states its rows continue from, and where to put the new ones.

    conv: [B, conv_dim, W - 1] (the last inputs of the convolution), recurrent: fp32 [B, HV, K, V];
    None for rows that start here (a prefill).
    """

    def read(self) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...

    def write(self, conv: torch.Tensor, recurrent: torch.Tensor) -> None: ...


class GatedRMSNorm(nn.Module):
    """RMSNorm of o (weight * o / rms(o), rounded to o's dtype) times silu(z), the product in fp32 (fp64 stays
    fp64), as transformers rounds it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        wide = x.to(dtype)
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * wide.to(x.dtype)
        return (out * F.silu(gate.to(dtype))).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs, fused_projections: bool):
        super().__init__()
        self.num_k_heads = args.linear_num_key_heads
        self.num_v_heads = args.linear_num_value_heads
        self.head_k_dim = args.linear_key_head_dim
        self.head_v_dim = args.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.fused_projections = fused_projections
        hidden = args.hidden_size
        if fused_projections:
            self.in_proj_qkvz = nn.Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(hidden, 2 * self.num_v_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(hidden, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(hidden, self.num_v_heads, bias=False)
            self.in_proj_a = nn.Linear(hidden, self.num_v_heads, bias=False)
        # Depthwise: weight [conv_dim, 1, W], the layout (and key) of the checkpoints' nn.Conv1d.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, args.linear_conv_kernel_dim, groups=self.conv_dim, bias=False
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(self.head_v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> qkv [B, T, conv_dim] ([q | k | v], heads contiguous), z [B, T, HV, Dv], b, a [B, T, HV]."""
        batch, seq, _ = x.shape
        if not self.fused_projections:
            z = self.in_proj_z(x).view(batch, seq, self.num_v_heads, self.head_v_dim)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        per_key_head = self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(batch, seq, self.num_k_heads, -1)
        q, k, v, z = qkvz.split(
            [self.head_k_dim, self.head_k_dim, per_key_head * self.head_v_dim, per_key_head * self.head_v_dim], dim=-1
        )
        b, a = self.in_proj_ba(x).view(batch, seq, self.num_k_heads, 2 * per_key_head).split(per_key_head, dim=-1)
        qkv = torch.cat([t.reshape(batch, seq, -1) for t in (q, k, v)], dim=-1)
        z = z.reshape(batch, seq, self.num_v_heads, self.head_v_dim)
        return qkv, z, b.reshape(batch, seq, self.num_v_heads), a.reshape(batch, seq, self.num_v_heads)

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        packed: PackedSequences | None = None,
        state: LinearAttentionState | None = None,
    ) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H].

        token_mask [B, T] (1 = token, 0 = padding) or None; packed: B == 1 holding several
        sequences, each starting from zero states; state: the generation cache's share of this
        layer (its rows continue from what it holds, and it receives the states after the last
        real token of each row).
        """
        batch, seq, _ = x.shape
        if token_mask is not None:
            token_mask = token_mask.to(torch.bool)
            x = x * token_mask[..., None].to(x.dtype)
        qkv, z, b, a = self.project(x)
        conv_state, recurrent_state = (None, None) if state is None else state.read()
        cu_seqlens = None if packed is None else packed.cu_seqlens
        weight = self.conv1d.weight[:, 0]
        qkv_conv, _ = causal_conv1d(qkv, weight, initial_state=conv_state, cu_seqlens=cu_seqlens)
        q, k, v = qkv_conv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(batch, seq, self.num_k_heads, self.head_k_dim)
        k = k.reshape(batch, seq, self.num_k_heads, self.head_k_dim)
        v = v.reshape(batch, seq, self.num_v_heads, self.head_v_dim)
        beta = b.sigmoid()
        # In fp32 (fp64 stays fp64): in fp16 exp(A_log) could overflow.
        wide = torch.promote_types(a.dtype, torch.float32)
        g = -self.A_log.to(wide).exp() * F.softplus(a.to(wide) + self.dt_bias)
        if token_mask is not None:
            beta, g = beta * token_mask[..., None], g * token_mask[..., None]
        rule = recurrent_gated_delta_rule if state is not None and seq == 1 else gated_delta_rule
        out, recurrent_state = rule(
            q, k, v, g, beta, initial_state=recurrent_state, output_final_state=state is not None,
            cu_seqlens=cu_seqlens, qk_l2norm=True,
        )
        if state is not None:
            state.write(last_conv_inputs(qkv, conv_state, token_mask, weight.shape[1]), recurrent_state)
        out = self.norm(out, z).reshape(batch, seq, self.value_dim)
        return self.out_proj(out)


def last_conv_inputs(
    qkv: torch.Tensor, conv_state: torch.Tensor | None, token_mask: torch.Tensor | None, width: int
) -> torch.Tensor:
    """[B, conv_dim, W - 1]: the convolution's last W - 1 inputs up to each row's last real token.

    Rows are left-padded (their last token is real) or right-padded (their real tokens come
    first); earlier inputs come from conv_state, or are zeros where the row starts.
    """
    batch, seq, channels = qkv.shape
    history = qkv.new_zeros(batch, width - 1, channels) if conv_state is None else conv_state.transpose(1, 2).to(qkv.dtype)
    extended = torch.cat((history, qkv), dim=1)
    if token_mask is None:
        return extended[:, -(width - 1):].transpose(1, 2).contiguous()
    # One past the last real token of each row, counted in `extended`.
    ends = seq - token_mask.flip(-1).to(torch.int32).argmax(-1) + (width - 1)
    index = ends[:, None] - torch.arange(width - 1, 0, -1, device=qkv.device)[None, :]
    return extended.gather(1, index[..., None].expand(batch, width - 1, channels)).transpose(1, 2).contiguous()
