"""Qwen3-VL and Qwen3-VL-MoE against transformers' own classes: vision tower, multimodal positions, logits,
gradients with the tower frozen and trained, packed rows, and checkpoints both ways."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_vl_checkpoints import IMAGE, MERGE, build_hf_vl_model, prompt_with_images

from gspo_engine.hf_checkpoint import hf_pieces, load_pretrained, save_pretrained
from gspo_engine.model import ImageInputs, PackedSequences, Qwen3VLModel
from gspo_engine.model.mrope import mrope_position_ids

TOLERANCE = 2e-4


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def models(request, tmp_path_factory):
    """(transformers model, ours loaded from its save_pretrained folder, the folder)."""
    hf = build_hf_vl_model(moe=request.param)
    folder = tmp_path_factory.mktemp("qwen3vl")
    hf.save_pretrained(folder)
    ours = load_pretrained(folder, dtype=torch.float32)
    assert isinstance(ours, Qwen3VLModel)
    return hf, ours, folder


def left_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return input_ids, mask


def hf_logits(hf, input_ids, pixel_values, grid, attention_mask=None):
    with torch.no_grad():
        return hf(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=grid,
            mm_token_type_ids=(input_ids == IMAGE).int(),
        ).logits


@pytest.mark.parametrize("sizes", [[(16, 24)], [(16, 24), (30, 12)]], ids=["one_image", "two_images"])
def test_logits_match_transformers(models, sizes):
    hf, ours, _ = models
    input_ids, pixel_values, grid = prompt_with_images(sizes, seed=len(sizes))
    expected = hf_logits(hf, input_ids[None], pixel_values, grid)
    with torch.no_grad():
        got = ours(input_ids[None], images=ImageInputs(pixel_values, grid))
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_left_padded_batch_with_images_in_both_rows(models):
    hf, ours, _ = models
    first, pixels_a, grid_a = prompt_with_images([(20, 8)], seed=3, text=2)
    second, pixels_b, grid_b = prompt_with_images([(16, 24), (12, 28)], seed=4, text=3)
    input_ids, mask = left_padded([first, second])
    pixel_values, grid = torch.cat([pixels_a, pixels_b]), torch.cat([grid_a, grid_b])
    expected = hf_logits(hf, input_ids, pixel_values, grid, mask)
    with torch.no_grad():
        got = ours(input_ids, attention_mask=mask, images=ImageInputs(pixel_values, grid))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOLERANCE, rtol=0)


def test_text_only_prompt(models):
    hf, ours, _ = models
    input_ids = torch.randint(0, IMAGE, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(input_ids=input_ids).logits
        got = ours(input_ids)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_vision_tower_matches_transformers(models):
    hf, ours, _ = models
    _, pixel_values, grid = prompt_with_images([(16, 24), (30, 12), (8, 8)], seed=6)
    with torch.no_grad():
        expected = hf.model.visual(pixel_values, grid_thw=grid)
        got = ours.encode_images(ImageInputs(pixel_values, grid))
    torch.testing.assert_close(got.embeds, expected.pooler_output, atol=1e-5, rtol=0)
    assert len(got.deepstack) == len(expected.deepstack_features) == 2
    for ours_layer, theirs in zip(got.deepstack, expected.deepstack_features):
        torch.testing.assert_close(ours_layer, theirs, atol=1e-5, rtol=0)
    assert got.tokens_per_image == [int(t * h * w) // MERGE**2 for t, h, w in grid.tolist()]


def test_position_ids_match_get_rope_index(models):
    hf, ours, _ = models
    first, _, grid_a = prompt_with_images([(16, 24), (30, 12)], seed=7, text=3)
    second, _, grid_b = prompt_with_images([(8, 28)], seed=8, text=6)
    input_ids, mask = left_padded([first, second])
    grid = torch.cat([grid_a, grid_b])
    expected, expected_deltas = hf.model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == IMAGE).int(), image_grid_thw=grid, attention_mask=mask
    )
    got, deltas = ours.position_ids_for(input_ids, grid, mask)
    assert torch.equal(got[:, mask.bool()], expected[:, mask.bool()])
    assert deltas.tolist() == expected_deltas[:, 0].tolist()
    # One sequence on its own: the text after an image resumes at start + max(h, w) of its merged grid.
    positions, delta = mrope_position_ids(first, grid_a, IMAGE, MERGE)
    assert torch.equal(positions, expected[:, 0, mask[0].bool()]) and delta == int(expected_deltas[0])


def test_wrong_number_of_image_tokens_is_an_error(models):
    _, ours, _ = models
    input_ids, pixel_values, grid = prompt_with_images([(16, 24)], seed=9)
    cut = input_ids[input_ids != IMAGE][:4]
    with pytest.raises(ValueError, match="image tokens"):
        ours(torch.cat([cut, torch.full((3,), IMAGE)])[None], images=ImageInputs(pixel_values, grid))
    with pytest.raises(ValueError, match="pixel_values"):
        ours.encode_images(ImageInputs(pixel_values[:-1], grid))


def test_packed_row_equals_separate_rows(models):
    _, ours, _ = models
    prompts = [prompt_with_images([(16, 24)], seed=10), prompt_with_images([(12, 20), (8, 8)], seed=11)]
    with torch.no_grad():
        separate = [ours(ids[None], images=ImageInputs(pv, grid))[0] for ids, pv, grid in prompts]
        row = torch.cat([ids for ids, _, _ in prompts])[None]
        images = ImageInputs(torch.cat([pv for _, pv, _ in prompts]), torch.cat([grid for _, _, grid in prompts]))
        packed = PackedSequences.from_lengths([len(ids) for ids, _, _ in prompts])
        together = ours(row, packed=packed, images=images)[0]
    torch.testing.assert_close(together, torch.cat(separate), atol=1e-5, rtol=0)


def _hf_parameter(hf, key):
    """transformers' parameter for checkpoint key `key` (its names are the released keys)."""
    return hf.get_parameter(key)


@pytest.mark.parametrize("freeze", [True, False], ids=["tower_frozen", "tower_trained"])
def test_gradients_match_transformers(models, freeze):
    hf, ours, _ = models
    input_ids, pixel_values, grid = prompt_with_images([(16, 24), (12, 20)], seed=12)
    weights = torch.randn(1, len(input_ids), ours.args.vocab_size, generator=torch.Generator().manual_seed(13))
    for model, tower in ((hf, hf.model.visual), (ours, ours.visual)):
        model.zero_grad(set_to_none=True)
        for parameter in tower.parameters():
            parameter.requires_grad_(not freeze)
    hf_loss = (hf(input_ids=input_ids[None], pixel_values=pixel_values, image_grid_thw=grid,
                  mm_token_type_ids=(input_ids[None] == IMAGE).int()).logits * weights).sum()
    hf_loss.backward()
    (ours(input_ids[None], images=ImageInputs(pixel_values, grid)) * weights).sum().backward()
    compared = 0
    for name, parameter in ours.named_parameters():
        if name.startswith("visual.") and freeze:
            assert parameter.grad is None
            continue
        piece = hf_pieces(name, parameter, ours.args)[0]
        theirs = _hf_parameter(hf, piece.hf_key).grad
        ours_grad = parameter.grad if theirs.shape == parameter.shape else piece.to_hf(parameter.grad)
        torch.testing.assert_close(ours_grad, theirs, atol=1e-4, rtol=1e-4, msg=name)
        compared += 1
    assert compared > 20
    for tower in (hf.model.visual, ours.visual):
        for parameter in tower.parameters():
            parameter.requires_grad_(True)


def test_saved_model_loads_in_transformers(models, tmp_path):
    hf, ours, _ = models
    save_pretrained(ours, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    reloaded = type(hf).from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    input_ids, pixel_values, grid = prompt_with_images([(16, 24), (30, 12)], seed=14)
    torch.testing.assert_close(hf_logits(reloaded, input_ids[None], pixel_values, grid),
                               hf_logits(hf, input_ids[None], pixel_values, grid), atol=1e-6, rtol=0)
    assert reloaded.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    # Ours loads its own folder back to the same weights.
    again = load_pretrained(tmp_path / "saved", dtype=torch.float32)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    if ours.args.is_moe:
        # Fused experts are written as released Qwen3-VL-MoE checkpoints hold them: [E, H, 2I] and [E, I, H].
        args = ours.args
        with safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as f:
            gate_up = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
            down = f.get_slice("model.language_model.layers.0.mlp.experts.down_proj").get_shape()
        assert gate_up == [args.num_experts, args.hidden_size, 2 * args.moe_intermediate_size]
        assert down == [args.num_experts, args.moe_intermediate_size, args.hidden_size]


def test_tied_embeddings_as_the_small_releases(tmp_path):
    """Qwen3-VL-2B / 4B tie lm_head to the embedding: no lm_head tensor is needed, and none is written."""
    hf = build_hf_vl_model(tie_word_embeddings=True, seed=2)
    hf.save_pretrained(tmp_path / "source")
    ours = load_pretrained(tmp_path / "source", dtype=torch.float32)
    assert ours.args.tie_word_embeddings and ours.lm_head is None
    input_ids, pixel_values, grid = prompt_with_images([(16, 24)], seed=15)
    with torch.no_grad():
        got = ours(input_ids[None], images=ImageInputs(pixel_values, grid))
    torch.testing.assert_close(got, hf_logits(hf, input_ids[None], pixel_values, grid), atol=TOLERANCE, rtol=0)
    save_pretrained(ours, tmp_path / "saved")
    reloaded = type(hf).from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(reloaded, input_ids[None], pixel_values, grid),
                               hf_logits(hf, input_ids[None], pixel_values, grid), atol=1e-6, rtol=0)
