"""Greedy generation with images: our slot decoder against transformers' generate, token for token."""

from __future__ import annotations

import pytest
import torch
from tiny_vl_checkpoints import IMAGE, VISION_END, VISION_START, VIDEO, build_hf_vl_model, prompt_with_images

from gspo_engine.hf_checkpoint import load_pretrained
from gspo_engine.model import ImageInputs
from gspo_engine.rollout import generate
from gspo_engine.model.kv_cache import slot_bytes

NEW_TOKENS = 12
VISION_TOKENS = [IMAGE, VIDEO, VISION_START, VISION_END]


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def models(request, tmp_path_factory):
    hf = build_hf_vl_model(moe=request.param, seed=3)
    folder = tmp_path_factory.mktemp("qwen3vl_generate")
    hf.save_pretrained(folder)
    return hf, load_pretrained(folder, dtype=torch.float32)


def hf_greedy(hf, input_ids, pixel_values, grid) -> list[int]:
    kwargs = {}
    if grid is not None:
        kwargs = dict(pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=(input_ids[None] == IMAGE).int())
    out = hf.generate(
        input_ids=input_ids[None], attention_mask=torch.ones(1, len(input_ids), dtype=torch.long), do_sample=False,
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, suppress_tokens=VISION_TOKENS, eos_token_id=None,
        pad_token_id=0, **kwargs,
    )
    return out[0, len(input_ids):].tolist()


def test_greedy_generation_with_images_matches_transformers(models):
    hf, ours = models
    prompts = [
        prompt_with_images([(16, 24)], seed=20),
        prompt_with_images([(16, 24), (30, 12)], seed=21, text=3),
        prompt_with_images([(8, 28)], seed=22, text=7),
    ]
    text_only = torch.randint(0, IMAGE, (9,), generator=torch.Generator().manual_seed(23))
    expected = [hf_greedy(hf, ids, pv, grid) for ids, pv, grid in prompts] + [hf_greedy(hf, text_only, None, None)]
    vision = [ours.prompt_vision(ids, ImageInputs(pv, grid)) for ids, pv, grid in prompts] + [None]
    token_lists = [ids.tolist() for ids, _, _ in prompts] + [text_only.tolist()]
    capacity = max(len(p) for p in token_lists) + NEW_TOKENS
    # Room for two sequences at once: the others wait and take over freed slots (and their position offsets).
    budget = 2 * slot_bytes(ours.args, capacity, torch.float32) / 1e9
    for kv_cache_gb in (None, budget):
        generation = generate(ours, token_lists, max_new_tokens=NEW_TOKENS, temperature=0, vision=vision,
                              kv_cache_gb=kv_cache_gb)
        assert generation.tokens == expected, kv_cache_gb


def test_vision_tokens_are_never_drawn(models):
    _, ours = models
    ids, pv, grid = prompt_with_images([(16, 24)], seed=24)
    vision = ours.prompt_vision(ids, ImageInputs(pv, grid))
    # Hidden states reduced to their first channel, and two vision tokens reading it with weights +-1000:
    # one of them is the most likely token at every step, unless the sampler passes them over.
    with torch.no_grad():
        saved_norm, saved_head = ours.norm.weight.detach().clone(), ours.lm_head.weight.detach().clone()
        ours.norm.weight.zero_()
        ours.norm.weight[0] = 1.0
        ours.lm_head.weight[IMAGE] = 0.0
        ours.lm_head.weight[VIDEO] = 0.0
        ours.lm_head.weight[IMAGE, 0] = 1000.0
        ours.lm_head.weight[VIDEO, 0] = -1000.0
    try:
        for temperature in (0.0, 1.0):
            generation = generate(ours, [ids.tolist()] * 4, max_new_tokens=8, temperature=temperature, seed=1,
                                  vision=[vision] * 4)
            drawn = {t for tokens in generation.tokens for t in tokens}
            assert drawn and not drawn & set(VISION_TOKENS)
    finally:
        with torch.no_grad():
            ours.norm.weight.copy_(saved_norm)
            ours.lm_head.weight.copy_(saved_head)
