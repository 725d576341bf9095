"""Qwen3-Next and the Qwen3.5 text models: Gated DeltaNet layers between gated full-attention layers.

Layer i mixes tokens with Gated DeltaNet (gated_deltanet.py) when args.layer_types[i] is
"linear_attention" and with gated attention otherwise (Qwen3-Next-80B-A3B: three linear layers,
then one full, twelve times). Next to Qwen3 the full-attention layers differ in three ways:
q_proj gives each head a query and an output gate ([q_h | gate_h]), RoPE turns only the first
partial_rotary_factor of each head, and the output is multiplied by sigmoid(gate) before o_proj.
Every RMSNorm outside the DeltaNet is zero-centred ((1 + w) * norm(x)). MoE layers add a shared
expert, scaled per token by sigmoid(shared_expert_gate(x)), to the routed experts.

The module names are the checkpoints' (`linear_attn.in_proj_qkvz`, `mlp.shared_expert.up_proj`, ...),
so hf_checkpoint.py maps them like Qwen3's; the routed experts are SparseMoE's grouped tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gspo_engine.model.args import NEXT_ARCHITECTURE, ModelArgs
from gspo_engine.model.gated_deltanet import GatedDeltaNet
from gspo_engine.model.kv_cache import LayerKVCache
from gspo_engine.model.layers import FeedForward, grouped_query_attention
from gspo_engine.model.moe import Routing, SparseMoE
from gspo_engine.model.packed import PackedSequences, packed_attention
from gspo_engine.model.qwen3 import ModelOutput, Qwen3Model, check_forced_experts, final_output, layer_attention_mask, run_layers
from gspo_engine.model.rope import apply_rotary, rotary_cos_sin


class ZeroCenteredRMSNorm(nn.Module):
    """(1 + weight) * x / rms(x), computed in fp32 (fp64 stays fp64) and rounded once at the end, as transformers'
    Qwen3NextRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        wide = x.to(dtype)
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (wide * (1.0 + self.weight.to(dtype))).to(x.dtype)


class GatedAttention(nn.Module):
    """Causal GQA attention with per-head q / k norms, partial RoPE and a sigmoid output gate per channel."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, 2 * self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, args.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor:
        """As layers.Attention.forward; cos / sin [B, T, rotary_dim] turn the leading rotary_dim channels of each head."""
        batch, seq, _ = x.shape
        q, gate = self.q_proj(x).view(batch, seq, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = partial_rotary(q, cos, sin), partial_rotary(k, cos, sin)
        out = attend(q, k, v, attn_mask, kv_cache, packed, self.num_heads // self.num_kv_heads)
        out = out.transpose(1, 2).reshape(batch, seq, -1) * torch.sigmoid(gate.reshape(batch, seq, -1))
        return self.o_proj(out)


def partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim] with its first cos.shape[-1] channels rotated, the others as they are."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    kv_cache: LayerKVCache | None, packed: PackedSequences | None, groups: int,
) -> torch.Tensor:
    """Causal attention [B, heads, T, D] the way layers.Attention runs it: packed, through a cache, masked or plain."""
    if packed is not None:
        return packed_attention(q, k, v, packed, groups)
    if kv_cache is not None:
        k, v = kv_cache.update(k, v)
        return grouped_query_attention(q.to(k.dtype), k, v, attn_mask, groups)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class SharedExpertMoE(SparseMoE):
    """The routed experts of SparseMoE plus a dense SwiGLU expert every token goes through, gated by sigmoid(w . x)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.shared_expert = FeedForward(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, forced_experts: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        routed, routing = super().forward(x, forced_experts)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared, routing


class HybridBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.is_linear_attention = args.is_linear_attention_layer(layer)
        self.input_layernorm = ZeroCenteredRMSNorm(args.hidden_size, args.rms_norm_eps)
        if self.is_linear_attention:
            self.linear_attn = GatedDeltaNet(args, fused_projections=args.architecture == NEXT_ARCHITECTURE)
        else:
            self.self_attn = GatedAttention(args)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.is_moe = args.is_moe_layer(layer)
        self.mlp = SharedExpertMoE(args) if self.is_moe else FeedForward(args.hidden_size, args.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        forced_experts: torch.Tensor | None,
        layer_cache=None,
        packed: PackedSequences | None = None,
    ) -> tuple[torch.Tensor, Routing | None]:
        normed = self.input_layernorm(x)
        if self.is_linear_attention:
            x = x + self.linear_attn(normed, token_mask, packed, layer_cache)
        else:
            x = x + self.self_attn(normed, cos, sin, attn_mask, layer_cache, packed)
        if not self.is_moe:
            return x + self.mlp(self.post_attention_layernorm(x)), None
        out, routing = self.mlp(self.post_attention_layernorm(x), forced_experts)
        return x + out, routing


class Qwen3NextModel(Qwen3Model):
    """Qwen3-Next / Qwen3.5 text model with Qwen3Model's interface (forward_hidden, forward, lm_head_weight)."""

    def __init__(self, args: ModelArgs):
        if not args.is_hybrid:
            raise ValueError(f"Qwen3NextModel needs a hybrid architecture, got {args.architecture}")
        nn.Module.__init__(self)  # Qwen3Model's __init__ would build Qwen3 blocks
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(args, layer) for layer in range(args.num_hidden_layers))
        self.norm = ZeroCenteredRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        forced_experts: Sequence[torch.Tensor | None] | None = None,
        cache=None,
        packed: PackedSequences | None = None,
    ) -> ModelOutput:
        """As Qwen3Model.forward_hidden. Padding (attention_mask 0) leaves the linear-attention states untouched;
        packed sequences each start from zero states; a cache carries those states from one call to the next."""
        batch, seq = input_ids.shape
        if packed is not None:
            packed.check_row(input_ids)
            if attention_mask is not None or cache is not None:
                raise ValueError("a packed forward takes neither an attention_mask nor a cache: it holds no padding")
            if position_ids is None:
                position_ids = packed.position_ids()
        check_forced_experts(self.args, forced_experts)
        if position_ids is None:
            if cache is not None:
                raise ValueError("a forward with a cache needs position_ids")
            position_ids = torch.arange(seq, device=input_ids.device)[None]
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(self.args, position_ids, x.dtype)
        attn_mask = layer_attention_mask(attention_mask, cache, seq)
        token_mask = None if attention_mask is None else attention_mask.to(torch.bool)

        x, routing = run_layers(self, x, (cos, sin, attn_mask, token_mask), forced_experts, cache, packed)
        return final_output(self, x, routing, attention_mask)


def build_model(args: ModelArgs) -> Qwen3Model:
    """The model class the arguments describe: Qwen3Model, or Qwen3NextModel for a hybrid architecture."""
    return Qwen3NextModel(args) if args.is_hybrid else Qwen3Model(args)
