"""Qwen3-VL (dense and MoE): the vision tower, and Qwen3 / Qwen3-MoE text layers under multimodal RoPE.

A forward embeds the tokens, puts the tower's merged image features in place of the image tokens
(in order: the images of row 0 first, each row's in the order its image tokens appear), runs the
Qwen3 layers with cos / sin from the three position ids of mrope.py, and after layer i < number of
DeepStack mergers adds that merger's features to the hidden states of the image tokens.

The module names are those of Qwen3Model plus `visual` (vision.py); hf_checkpoint.py maps them to the
released keys (`model.language_model.*`, `model.visual.*`, `lm_head.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from gspo_engine.model.args import ModelArgs
from gspo_engine.model.audio import AudioInputs
from gspo_engine.model.kv_cache import KVCache
from gspo_engine.model.mrope import mrope_cos_sin, mrope_position_ids
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.qwen3 import ModelOutput, Qwen3Model, check_forced_experts, final_output, layer_attention_mask, run_layers
from gspo_engine.model.vision import VisionFeatures, VisionTower


@dataclass
class ImageInputs:
    """The processor's output for a set of images: pixel_values [N, patch_dim], grid_thw [I, 3] (int64)."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor

    def to(self, device: torch.device | str) -> "ImageInputs":
        return ImageInputs(self.pixel_values.to(device), self.grid_thw.to(device))


@dataclass
class PromptVision:
    """What a prompt with images needs at every forward, computed once per prompt.

    features: the tower's output for the prompt's images (in their order in the prompt), without gradients;
    position_ids [3, L] of the prompt's L tokens; delta: the text position of token j >= L is j + delta;
    images: the processor's output, for a tower that computes the features again (when it trains);
    tower: id() of the vision tower that computed `features` (another model's tower computes its own);
    audio [M, H], audios: a Qwen3-Omni prompt's audio features and the feature extractor's output (qwen3_omni.py).
    """

    features: VisionFeatures
    position_ids: torch.Tensor
    delta: int
    images: ImageInputs | None = None
    tower: int = 0
    audio: torch.Tensor | None = None
    audios: AudioInputs | None = None

    def sequence_position_ids(self, length: int) -> torch.Tensor:
        """[3, length]: the prompt's positions, then those of the tokens after it (a completion)."""
        prompt = self.position_ids.shape[1]
        after = torch.arange(prompt, length, device=self.position_ids.device) + self.delta
        return torch.cat((self.position_ids, after.expand(3, -1)), dim=1)


class VisionLanguage:
    """What an image-text model adds to its text model: the tower's features, multimodal positions, the
    embeddings with the images in place. Mixed into Qwen3VLModel and qwen3_vl_hybrid.Qwen3_5VLModel, which
    set `self.visual`; their forward_hidden runs their own text layers.
    """

    visual: VisionTower

    def encode_images(self, images: ImageInputs) -> VisionFeatures:
        return self.visual(images.pixel_values, images.grid_thw)

    def prompt_vision(
        self, input_ids: torch.Tensor, images: ImageInputs, features: VisionFeatures | None = None
    ) -> PromptVision:
        """PromptVision of one prompt input_ids [L] whose images are `images` (features: their tower output,
        when already computed)."""
        vision = self.args.vision
        device = self.embed_tokens.weight.device
        position_ids, delta = mrope_position_ids(
            input_ids.cpu(), images.grid_thw.cpu(), vision.image_token_id, vision.spatial_merge_size
        )
        if features is None:
            with torch.no_grad():
                features = self.encode_images(images.to(device))
        return PromptVision(features.detach(), position_ids.to(device), delta, images, id(self.visual))

    def features_of(self, visions: Sequence[PromptVision | None]) -> VisionFeatures | None:
        """The image features of a batch's rows (those with a PromptVision), in row order.

        A prompt's stored features serve every completion of it while this model's tower made them and is
        not being trained; a trained tower (grad enabled, parameters requiring grad) or another model's
        computes them again, once per prompt.
        """
        present = [v for v in visions if v is not None]
        if not present:
            return None
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.visual.parameters())
        computed: dict[int, VisionFeatures] = {}
        parts = []
        for vision in present:
            if (not training and vision.tower == id(self.visual)) or not vision.features.tokens_per_image:
                parts.append(vision.features)
                continue
            if id(vision) not in computed:
                if vision.images is None:
                    raise ValueError("a prompt's image features must be computed again, and it kept no images")
                computed[id(vision)] = self.encode_images(vision.images.to(self.embed_tokens.weight.device))
            parts.append(computed[id(vision)])
        return VisionFeatures.concat(parts)

    def position_ids_for(
        self, input_ids: torch.Tensor, grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, T] and deltas [B] for rows input_ids [B, T] whose images have grid_thw [I, 3] (row-major).

        Padding columns (attention_mask 0) get position 0, as transformers gives them.
        """
        vision = self.args.vision
        batch, seq = input_ids.shape
        positions = torch.zeros(3, batch, seq, dtype=torch.long, device=input_ids.device)
        deltas = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        grids = grid_thw if grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
        used = 0
        for row in range(batch):
            keep = slice(None) if attention_mask is None else attention_mask[row].bool()
            tokens = input_ids[row][keep]
            count = _image_runs(tokens, vision.image_token_id)
            row_positions, delta = mrope_position_ids(
                tokens, grids[used : used + count], vision.image_token_id, vision.spatial_merge_size
            )
            positions[:, row, keep] = row_positions
            deltas[row] = delta
            used += count
        if used != grids.shape[0]:
            raise ValueError(f"{grids.shape[0]} image grids given for {used} images in the rows")
        return positions, deltas

    def _multimodal_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
        cache, packed: PackedSequences | None, images: ImageInputs | None, image_features: VisionFeatures | None,
        visions: Sequence[PromptVision | None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """The checks of a forward, then x (embeddings with the image features in place), cos, sin, the image
        tokens' mask [B, T] (None without images) and the DeepStack features to add after the first layers."""
        if sum(given is not None for given in (images, image_features, visions)) > 1:
            raise ValueError("give one of images, image_features and visions")
        if packed is not None:
            packed.check_row(input_ids)
            if attention_mask is not None or cache is not None:
                raise ValueError("a packed forward takes neither an attention_mask nor a cache: it holds no padding")
        grid_thw = None if images is None else images.grid_thw
        if position_ids is None and cache is not None:
            raise ValueError("a forward with a cache needs position_ids")
        if position_ids is None:
            position_ids = self._default_position_ids(input_ids, attention_mask, grid_thw, packed)
        elif position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, *position_ids.shape)
        if images is not None:
            image_features = self.encode_images(images)
        if visions is not None:
            # Inside the forward: a sharded model (FSDP2) has gathered the tower's weights by now.
            image_features = self.features_of(visions)

        x = self.embed_tokens(input_ids)
        image_mask = None
        if image_features is not None:
            image_mask = input_ids == self.args.vision.image_token_id
            count = int(image_mask.sum())
            if count != image_features.embeds.shape[0]:
                raise ValueError(
                    f"the rows hold {count} image tokens and the images give {image_features.embeds.shape[0]} features"
                )
            x = x.masked_scatter(image_mask[..., None], image_features.embeds.to(x.dtype))
        cos, sin = mrope_cos_sin(self.args, position_ids, x.dtype)
        deepstack = [] if image_features is None else image_features.deepstack
        return x, cos, sin, image_mask, deepstack

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        forced_experts: Sequence[torch.Tensor | None] | None = None,
        packed: PackedSequences | None = None,
        images: ImageInputs | None = None,
        image_features: VisionFeatures | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] in the model dtype."""
        hidden = self.forward_hidden(
            input_ids, attention_mask, position_ids, forced_experts, packed=packed, images=images,
            image_features=image_features,
        ).hidden_states
        return F.linear(hidden, self.lm_head_weight)

    def _default_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, grid_thw: torch.Tensor | None,
        packed: PackedSequences | None,
    ) -> torch.Tensor:
        if packed is None:
            return self.position_ids_for(input_ids, grid_thw, attention_mask)[0]
        vision = self.args.vision
        pieces, used = [], 0
        grids = grid_thw if grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
        for tokens in input_ids[0].split(list(packed.lengths)):
            count = _image_runs(tokens, vision.image_token_id)
            positions, _ = mrope_position_ids(
                tokens, grids[used : used + count], vision.image_token_id, vision.spatial_merge_size
            )
            pieces.append(positions)
            used += count
        return torch.cat(pieces, dim=1)[:, None]


def add_deepstack(x: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """x [B, T, H] with features [M, H] added at the M image tokens (image_mask [B, T])."""
    return x.masked_scatter(image_mask[..., None], x[image_mask] + features.to(x.dtype))


def deepstack_after(index: int, x: torch.Tensor, image_mask: torch.Tensor, deepstack: list[torch.Tensor]) -> torch.Tensor:
    """x after LLM layer `index`: the index-th DeepStack features added at the image tokens, for the first layers."""
    return add_deepstack(x, image_mask, deepstack[index]) if index < len(deepstack) else x


class Qwen3VLModel(VisionLanguage, Qwen3Model):
    """Qwen3Model's interface (forward_hidden, forward, lm_head_weight) with images.

    position_ids may be [3, B, T] (multimodal; from `position_ids_for`) or [B, T] / None as for
    Qwen3Model, in which case a prompt with images gets its multimodal positions computed here.
    """

    def __init__(self, args: ModelArgs):
        if args.vision is None:
            raise ValueError("Qwen3VLModel needs vision arguments (args.vision)")
        super().__init__(args)
        self.visual = VisionTower(args.vision)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        forced_experts: Sequence[torch.Tensor | None] | None = None,
        cache: KVCache | None = None,
        packed: PackedSequences | None = None,
        images: ImageInputs | None = None,
        image_features: VisionFeatures | None = None,
        visions: Sequence[PromptVision | None] | None = None,
    ) -> ModelOutput:
        """As Qwen3Model.forward_hidden, with the images of the rows' image tokens as `images` (run through the
        tower here), as `image_features` (the tower's output, e.g. computed once for a group of completions), or
        as `visions`, each row's PromptVision or None (their features as `features_of` gives them).

        A packed row (model/packed.py) computes each sequence's multimodal positions on its own unless
        position_ids [3, 1, N] are given.
        """
        seq = input_ids.shape[1]
        check_forced_experts(self.args, forced_experts)
        x, cos, sin, image_mask, deepstack = self._multimodal_inputs(
            input_ids, attention_mask, position_ids, cache, packed, images, image_features, visions
        )
        attn_mask = layer_attention_mask(attention_mask, cache, seq)

        x, routing = run_layers(self, x, (cos, sin, attn_mask), forced_experts, cache, packed,
                                lambda index, x: deepstack_after(index, x, image_mask, deepstack))
        return final_output(self, x, routing, attention_mask)


def _image_runs(tokens: torch.Tensor, image_token_id: int) -> int:
    """How many runs of consecutive image tokens (one per image) tokens [T] holds."""
    is_image = (tokens == image_token_id).to(torch.int8)
    if is_image.numel() == 0:
        return 0
    starts = is_image[1:] > is_image[:-1]
    return int(starts.sum()) + int(is_image[0])
