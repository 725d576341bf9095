"""Qwen3 building blocks: RMSNorm, grouped-query attention with per-head q / k norms, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gspo_engine.model.args import ModelArgs
from gspo_engine.model.kv_cache import LayerKVCache
from gspo_engine.model.packed import PackedSequences, packed_attention
from gspo_engine.model.rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32, cast back before the weight is applied: the rounding transformers does.
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Causal GQA attention; q and k are RMS-normalised per head before RoPE (the Qwen3 change over Qwen2)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor:
        """x [B, T, H]; attn_mask None (plain causal) or bool [B, 1, T, T], True where a query may attend.

        With packed (B = 1, several sequences end to end; model/packed.py) attention stays inside
        each sequence, and attn_mask is None.

        With kv_cache (generation) the new keys and values are written into it and the queries
        attend to every cached column: attn_mask is then bool [B, 1, T, S], S the columns so far.
        """
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if packed is not None:
            out = packed_attention(q, k, v, packed, groups)
        elif kv_cache is not None:
            k, v = kv_cache.update(k, v)
            # Under autocast the cache holds autocast's dtype, while q leaves the fp32 q norm in fp32.
            out = grouped_query_attention(q.to(k.dtype), k, v, attn_mask, groups)
        elif attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        else:
            # The fused GPU kernels take GQA only without a mask; with one, the kv heads are repeated
            # (what transformers does too, which keeps both on the same kernel).
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def grouped_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, groups: int
) -> torch.Tensor:
    """q [B, kv_heads * groups, T, D] against k, v [B, kv_heads, S, D] under attn_mask bool [B, 1, T, S].

    The query heads that share a kv head are contiguous (head h reads kv head h // groups), so
    they are folded into the query length instead of repeating the cached keys and values: a
    decode step then reads the cache once rather than `groups` times.
    """
    batch, heads, seq, dim = q.shape
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    q = q.reshape(batch, heads // groups, groups * seq, dim)
    keys = attn_mask.shape[-1]
    mask = attn_mask[:, :, None].expand(batch, 1, groups, seq, keys).reshape(batch, 1, groups * seq, keys)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, heads, seq, dim)


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T] from a padding mask [B, T] (1 = token, 0 = padding), causal included.

    A padding query would see no key at all and SDPA would give it NaN, which then leaks into
    every later layer's values; such a query is let to attend to itself. Its output is never used.
    """
    seq = attention_mask.shape[-1]
    keys = attention_mask.bool()[:, None, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    diagonal = torch.eye(seq, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | diagonal
