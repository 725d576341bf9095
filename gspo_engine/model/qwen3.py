"""Qwen3 dense and Qwen3-MoE causal language model as one plain nn.Module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gspo_engine.model.args import ModelArgs
from gspo_engine.model.kv_cache import KVCache, LayerKVCache
from gspo_engine.model.layers import Attention, FeedForward, RMSNorm, attention_mask_4d
from gspo_engine.model.moe import Routing, SparseMoE, switch_aux_loss
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.rope import rotary_cos_sin


@dataclass
class ModelOutput:
    """hidden_states [B, T, H] after the final norm; one Routing per MoE layer, in layer order.

    aux_loss is router_aux_loss_coef times the mean over MoE layers of the Switch loss, or None
    unless args.router_aux_loss is set.
    """

    hidden_states: torch.Tensor
    routing: list[Routing] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.is_moe = args.is_moe_layer(layer)
        self.mlp = SparseMoE(args) if self.is_moe else FeedForward(args.hidden_size, args.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        forced_experts: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
        packed: PackedSequences | None = None,
    ) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache, packed)
        if not self.is_moe:
            return x + self.mlp(self.post_attention_layernorm(x)), None
        out, routing = self.mlp(self.post_attention_layernorm(x), forced_experts)
        return x + out, routing


class Qwen3Model(nn.Module):
    """Token ids [B, T] -> hidden states [B, T, H] -> logits [B, T, V].

    Training code takes `forward_hidden` (hidden states, MoE routing, aux loss) and `lm_head_weight` and
    computes the loss with a fused kernel, so [B, T, V] is never built; `forward` gives logits.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(args, layer) for layer in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the output projection, which is the embedding when the checkpoint ties them."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        forced_experts: Sequence[torch.Tensor | None] | None = None,
        cache: KVCache | None = None,
        packed: PackedSequences | None = None,
    ) -> ModelOutput:
        """The full forward up to the final norm.

        input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding) or None; position_ids
        [B, T] or None for 0..T-1 (as in transformers: a left-padded batch passes both, e.g.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)); forced_experts: one
        [B, T, k] tensor (or None to route freely) per MoE layer, in layer order.

        With a cache (generation) the T tokens follow the cache's columns: their keys and values
        are appended to it, they attend to every earlier real token, and position_ids must be
        given (the rows' positions differ once prompts are left-padded).

        With packed (model/packed.py), input_ids [1, N] holds several sequences end to end with
        no padding: attention stays inside each sequence, position_ids default to each sequence's
        own 0..n-1, and attention_mask and cache must be None.
        """
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

        x, routing = run_layers(self, x, (cos, sin, attn_mask), forced_experts, cache, packed)
        return final_output(self, x, routing, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        forced_experts: Sequence[torch.Tensor | None] | None = None,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] in the model dtype."""
        hidden = self.forward_hidden(
            input_ids, attention_mask, position_ids, forced_experts, packed=packed
        ).hidden_states
        return F.linear(hidden, self.lm_head_weight)


def layer_attention_mask(attention_mask: torch.Tensor | None, cache, seq: int) -> torch.Tensor | None:
    """The attention layers' mask: the cache's over its columns while decoding, else the padding mask made
    [B, 1, T, T] (None without padding: causal attention alone)."""
    if cache is not None:
        return cache.attention_mask(attention_mask, seq)
    return None if attention_mask is None else attention_mask_4d(attention_mask)


def check_forced_experts(args: ModelArgs, forced_experts: Sequence[torch.Tensor | None] | None) -> None:
    moe_layers = args.moe_layers
    if forced_experts is not None and len(forced_experts) != len(moe_layers):
        raise ValueError(f"forced_experts has {len(forced_experts)} entries for {len(moe_layers)} MoE layers")


def run_layers(
    model: nn.Module,
    x: torch.Tensor,
    leading: tuple,
    forced_experts: Sequence[torch.Tensor | None] | None,
    cache,
    packed: PackedSequences | None,
    after_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[Routing]]:
    """x through model.layers, each called as block(x, *leading, its forced experts, its cache, packed),
    recomputed in the backward under args.activation_checkpointing; after_layer(index, x) -> x runs
    after each block (DeepStack). Marks the cache's new columns written. Returns x and the MoE routing."""
    forced = iter(forced_experts or [None] * len(model.args.moe_layers))
    routing: list[Routing] = []
    for index, block in enumerate(model.layers):
        layer_forced = next(forced) if block.is_moe else None
        layer_cache = None if cache is None else cache.layers[index]
        arguments = (x, *leading, layer_forced, layer_cache, packed)
        if model.args.activation_checkpointing and torch.is_grad_enabled():
            x, layer_routing = checkpoint(block, *arguments, use_reentrant=False)
        else:
            x, layer_routing = block(*arguments)
        if layer_routing is not None:
            routing.append(layer_routing)
        if after_layer is not None:
            x = after_layer(index, x)
    if cache is not None:
        cache.advance(x.shape[1])
    return x, routing


def final_output(model: nn.Module, x: torch.Tensor, routing: list[Routing],
                 attention_mask: torch.Tensor | None) -> ModelOutput:
    """The final norm, and the aux loss over the MoE layers' routing (padding left out) when args ask for it."""
    output = ModelOutput(hidden_states=model.norm(x), routing=routing)
    args = model.args
    if args.router_aux_loss and routing:
        token_mask = None if attention_mask is None else attention_mask.reshape(-1)
        losses = [switch_aux_loss(r, args.num_experts, token_mask) for r in routing]
        output.aux_loss = args.router_aux_loss_coef * torch.stack(losses).mean()
    return output
