"""Qwen3.5's image-text models (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration): Qwen3-VL's
vision tower without DeepStack mergers, and the hybrid Qwen3.5 text layers (qwen3_next.py) under multimodal RoPE
over their rotary part; and `build_model`, the model class a config names.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gspo_engine.model.args import ModelArgs
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.qwen3 import ModelOutput, Qwen3Model, check_forced_experts, final_output, layer_attention_mask, run_layers
from gspo_engine.model.qwen3_next import Qwen3NextModel
from gspo_engine.model.qwen3_omni import Qwen3OmniThinker
from gspo_engine.model.qwen3_next import build_model as build_text_model
from gspo_engine.model.qwen3_vl import ImageInputs, PromptVision, Qwen3VLModel, VisionLanguage, deepstack_after
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
        check_forced_experts(self.args, forced_experts)
        x, cos, sin, image_mask, deepstack = self._multimodal_inputs(
            input_ids, attention_mask, position_ids, cache, packed, images, image_features, visions
        )
        attn_mask = layer_attention_mask(attention_mask, cache, seq)
        token_mask = None if attention_mask is None else attention_mask.to(torch.bool)

        x, routing = run_layers(self, x, (cos, sin, attn_mask, token_mask), forced_experts, cache, packed,
                                lambda index, x: deepstack_after(index, x, image_mask, deepstack))
        return final_output(self, x, routing, attention_mask)


def build_model(args: ModelArgs) -> Qwen3Model:
    """The model class the arguments describe: with a vision tower Qwen3VLModel (Qwen3 text layers),
    Qwen3OmniThinker (those and an audio encoder) or Qwen3_5VLModel (hybrid ones), else qwen3_next.build_model's
    text model."""
    if args.vision is None:
        return build_text_model(args)
    if args.audio is not None:
        return Qwen3OmniThinker(args)
    return Qwen3_5VLModel(args) if args.is_hybrid else Qwen3VLModel(args)
