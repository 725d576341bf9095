"""Qwen3.5's image-text models (dense and MoE) against transformers: logits with images, greedy generation."""

from __future__ import annotations

import pytest
import torch
from tiny_hybrid_checkpoints import COMMON, MULTIMODAL, VARIANTS, VISION
from tiny_vl_checkpoints import random_image
from transformers import Qwen2VLImageProcessorPil

from gspo_engine.hf_checkpoint import load_pretrained, save_pretrained
from gspo_engine.model import ImageInputs, PackedSequences, Qwen3_5VLModel
from gspo_engine.rollout import generate

NEW_TOKENS = 8


TOKENS = dict(image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)


def build_hf_model(variant: str, seed: int) -> torch.nn.Module:
    """A random fp32 Qwen3.5 image-text model whose vision tokens are in the tiny vocabulary; every weight matters."""
    torch.manual_seed(seed)
    config_class, model_class, text_variant = MULTIMODAL[variant]
    text = COMMON | VARIANTS[text_variant][2]
    model = model_class(config_class(text_config=text, vision_config=VISION, tie_word_embeddings=False, **TOKENS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, text["initializer_range"])
            else:
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen3.5-vl", "qwen3.5-moe-vl"])
def models(request, tmp_path_factory):
    hf = build_hf_model(request.param, seed=7)
    folder = tmp_path_factory.mktemp("qwen3_5_vl")
    hf.save_pretrained(folder)
    ours = load_pretrained(folder, dtype=torch.float32)
    assert isinstance(ours, Qwen3_5VLModel) and ours.args.vision.deepstack_visual_indexes == []
    return hf, ours


def prompt(hf, sizes, seed):
    """input_ids [T], pixel_values, image_grid_thw: text around each image's start / pads / end tokens."""
    config = hf.config
    processed = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                         size={"shortest_edge": 64, "longest_edge": 576})(
        images=[random_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)], return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(0, 80, (4,), generator=generator)]
    for t, h, w in processed["image_grid_thw"].tolist():
        pieces.append(torch.tensor([config.vision_start_token_id] + [config.image_token_id] * (t * h * w // 4)
                                   + [config.vision_end_token_id]))
        pieces.append(torch.randint(0, 80, (3,), generator=generator))
    return torch.cat(pieces), processed["pixel_values"], processed["image_grid_thw"]


@pytest.mark.parametrize("sizes", [[(16, 24)], [(16, 24), (30, 12)]], ids=["one_image", "two_images"])
def test_logits_match_transformers(models, sizes):
    hf, ours = models
    ids, pixels, grid = prompt(hf, sizes, seed=len(sizes))
    image = hf.config.image_token_id
    with torch.no_grad():
        expected = hf(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
                      mm_token_type_ids=(ids[None] == image).int()).logits
        got = ours(ids[None], images=ImageInputs(pixels, grid))
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_greedy_generation_and_save(models, tmp_path):
    hf, ours = models
    config = hf.config
    banned = [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]
    prompts = [prompt(hf, [(16, 24)], seed=11), prompt(hf, [(12, 20), (8, 8)], seed=12)]
    expected = []
    for ids, pixels, grid in prompts:
        out = hf.generate(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids[None] == config.image_token_id).int(),
                          do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, suppress_tokens=banned,
                          eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(ids):].tolist())
    vision = [ours.prompt_vision(ids, ImageInputs(pixels, grid)) for ids, pixels, grid in prompts]
    generation = generate(ours, [ids.tolist() for ids, _, _ in prompts], max_new_tokens=NEW_TOKENS, temperature=0,
                          vision=vision)
    assert generation.tokens == expected
    save_pretrained(ours, tmp_path / "saved")
    reloaded = type(hf).from_pretrained(tmp_path / "saved", dtype=torch.float32)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_packed_row_equals_separate_rows(models):
    hf, ours = models
    prompts = [prompt(hf, [(16, 24)], seed=13), prompt(hf, [(12, 20), (8, 8)], seed=14)]
    with torch.no_grad():
        separate = [ours(ids[None], images=ImageInputs(pixels, grid))[0] for ids, pixels, grid in prompts]
        row = torch.cat([ids for ids, _, _ in prompts])[None]
        images = ImageInputs(torch.cat([p for _, p, _ in prompts]), torch.cat([g for _, _, g in prompts]))
        packed = PackedSequences.from_lengths([len(ids) for ids, _, _ in prompts])
        together = ours(row, packed=packed, images=images)[0]
    torch.testing.assert_close(together, torch.cat(separate), atol=1e-5, rtol=0)
