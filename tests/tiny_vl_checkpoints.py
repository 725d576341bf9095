"""Tiny random Qwen3-VL / Qwen3-VL-MoE models made by transformers, and images run through its image processor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (
    Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

VOCAB = 64
IMAGE, VIDEO, VISION_START, VISION_END = 60, 61, 62, 63
MERGE = 2
TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    initializer_range=0.1,
)
MOE_TEXT = TEXT | dict(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2)
VISION = dict(
    depth=3, hidden_size=24, num_heads=2, intermediate_size=40, patch_size=4, temporal_patch_size=2,
    spatial_merge_size=MERGE, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0, 2],
    initializer_range=0.1,
)
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


def build_hf_vl_model(moe: bool = False, seed: int = 0, tie_word_embeddings: bool = False) -> torch.nn.Module:
    """A random fp32 Qwen3-VL (or Qwen3-VL-MoE) in eval mode; norms randomised too, so every weight matters."""
    torch.manual_seed(seed)
    if moe:
        config = Qwen3VLMoeConfig(text_config=MOE_TEXT | {"tie_word_embeddings": tie_word_embeddings},
                                  vision_config=VISION, tie_word_embeddings=tie_word_embeddings, **TOKENS)
        model = Qwen3VLMoeForConditionalGeneration(config)
    else:
        config = Qwen3VLConfig(text_config=TEXT | {"tie_word_embeddings": tie_word_embeddings}, vision_config=VISION,
                               tie_word_embeddings=tie_word_embeddings, **TOKENS)
        model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                param.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("bias"):
                param.uniform_(-0.2, 0.2)
    return model.eval()


def image_processor() -> Qwen2VLImageProcessorPil:
    """transformers' Qwen2-VL image processor at the tiny tower's patch size; images of 64 to 576 pixels."""
    return Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=MERGE, size={"shortest_edge": 64, "longest_edge": 576},
    )


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def prompt_with_images(sizes: list[tuple[int, int]], seed: int = 0, text: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [T], pixel_values, image_grid_thw: random text around each image's start / pads / end tokens."""
    generator = torch.Generator().manual_seed(seed)
    images = [random_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    processed = image_processor()(images=images, return_tensors="pt")
    grid = processed["image_grid_thw"]
    pieces = [torch.randint(0, IMAGE, (text,), generator=generator)]
    for t, h, w in grid.tolist():
        pieces.append(torch.tensor([VISION_START] + [IMAGE] * (t * h * w // MERGE**2) + [VISION_END]))
        pieces.append(torch.randint(0, IMAGE, (text,), generator=generator))
    return torch.cat(pieces), processed["pixel_values"], grid
