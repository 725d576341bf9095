"""Qwen3.5's image-text models (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration): Qwen3-VL's
vision tower without DeepStack mergers, and the hybrid Qwen3.5 text layers (qwen3_next.py) under multimodal RoPE
over their rotary part; and `build_model`, the model class a config names.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from gspo_engine.model.args import ModelArgs
from gspo_engine.model.layers import attention_mask_4d
from gspo_engine.model.moe import Routing, switch_aux_loss
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.qwen3 import ModelOutput, Qwen3Model
from gspo_engine.model.qwen3_next import Qwen3NextModel
from gspo_engine.model.qwen3_next import build_model as build_text_model
from gspo_engine.model.qwen3_vl import ImageInputs, PromptVision, Qwen3VLModel, VisionLanguage, add_deepstack
from gspo_engine.model.vision import VisionFeatures, VisionTower


class Qwen3_5VLModel(VisionLanguage, Qwen3NextModel):
    """Qwen3NextModel's interface with images, as Qwen3VLModel gives Qwen3Model's."""

    def __init__(self, args: ModelArgs):
        if args.vision is None or not args.is_hybrid:
            raise ValueError("Qwen3_5VLModel needs a hybrid architecture and vision arguments (args.vision)")
        super().__init__(args)
        self.visual = VisionTower(args.vision)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        forced_experts: Sequence[torch.Tensor | None] | None = None,
        cache=None,
        packed: PackedSequences | None = None,
        images: ImageInputs | None = None,
        image_features: VisionFeatures | None = None,
        visions: Sequence[PromptVision | None] | None = None,
    ) -> ModelOutput:
        """As Qwen3NextModel.forward_hidden, with images as Qwen3VLModel.forward_hidden takes them."""
        seq = input_ids.shape[1]
        moe_layers = self.args.moe_layers
        if forced_experts is not None and len(forced_experts) != len(moe_layers):
            raise ValueError(f"forced_experts has {len(forced_experts)} entries for {len(moe_layers)} MoE layers")
        x, cos, sin, image_mask, deepstack = self._multimodal_inputs(
            input_ids, attention_mask, position_ids, cache, packed, images, image_features, visions
        )
        if cache is not None:
            attn_mask = cache.attention_mask(attention_mask, seq)
        else:
            attn_mask = None if attention_mask is None else attention_mask_4d(attention_mask)
        token_mask = None if attention_mask is None else attention_mask.to(torch.bool)

        forced = iter(forced_experts or [None] * len(moe_layers))
        routing: list[Routing] = []
        for index, block in enumerate(self.layers):
            layer_forced = next(forced) if block.is_moe else None
            layer_cache = None if cache is None else cache.layers[index]
            arguments = (x, cos, sin, attn_mask, token_mask, layer_forced, layer_cache, packed)
            if self.args.activation_checkpointing and torch.is_grad_enabled():
                x, layer_routing = checkpoint(block, *arguments, use_reentrant=False)
            else:
                x, layer_routing = block(*arguments)
            if layer_routing is not None:
                routing.append(layer_routing)
            if index < len(deepstack):
                x = add_deepstack(x, image_mask, deepstack[index])
        if cache is not None:
            cache.advance(seq)

        output = ModelOutput(hidden_states=self.norm(x), routing=routing)
        if self.args.router_aux_loss and routing:
            flat_mask = None if attention_mask is None else attention_mask.reshape(-1)
            losses = [switch_aux_loss(r, self.args.num_experts, flat_mask) for r in routing]
            output.aux_loss = self.args.router_aux_loss_coef * torch.stack(losses).mean()
        return output


def build_model(args: ModelArgs) -> Qwen3Model:
    """The model class the arguments describe: with a vision tower Qwen3VLModel (Qwen3 text layers) or
    Qwen3_5VLModel (hybrid ones), else qwen3_next.build_model's text model."""
    if args.vision is None:
        return build_text_model(args)
    return Qwen3_5VLModel(args) if args.is_hybrid else Qwen3VLModel(args)
