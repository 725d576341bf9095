"""The Qwen3-Omni thinker against transformers' own classes: audio encoder, positions, logits on text + image + audio
prompts, greedy generation, and a modified checkpoint that transformers loads as the full Omni model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_omni_checkpoints import (
    AUDIO_PAD, SPECIAL, VIDEO, VISION_END, VISION_START, build_hf_omni_model, hf_inputs, omni_prompt,
)
from transformers import Qwen3OmniMoeForConditionalGeneration

from gspo_engine.hf_checkpoint import load_pretrained, save_pretrained
from gspo_engine.model import ImageInputs, PackedSequences
from gspo_engine.model.audio import AudioInputs, audio_token_count
from gspo_engine.model.qwen3_omni import Qwen3OmniThinker, VideoInputs
from gspo_engine.rollout import generate

TOLERANCE = 2e-4
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers' full Omni model, our thinker loaded from its save_pretrained folder, the folder)."""
    hf = build_hf_omni_model()
    folder = tmp_path_factory.mktemp("qwen3omni")
    hf.save_pretrained(folder)
    ours = load_pretrained(folder, dtype=torch.float32)
    assert isinstance(ours, Qwen3OmniThinker)
    return hf, ours, folder


def our_inputs(audio, images) -> dict:
    kwargs = {}
    if audio is not None:
        kwargs["audios"] = AudioInputs.from_extractor(audio["input_features"], audio["attention_mask"])
    if images is not None:
        kwargs["images"] = ImageInputs(images["pixel_values"], images["image_grid_thw"])
    return kwargs


@pytest.mark.parametrize(
    "image_sizes, audio_seconds",
    [([(16, 24)], [0.5, 1.3]), ([], [2.2]), ([(16, 24), (12, 20)], [])],
    ids=["image_and_two_audios", "audio_only", "two_images"],
)
def test_logits_match_transformers(models, image_sizes, audio_seconds):
    hf, ours, _ = models
    input_ids, audio, images = omni_prompt(image_sizes, audio_seconds, seed=len(image_sizes) + len(audio_seconds))
    mask = torch.ones(1, len(input_ids), dtype=torch.long)
    with torch.no_grad():
        expected = hf.thinker(input_ids=input_ids[None], attention_mask=mask, **hf_inputs(audio, images)).logits
        got = ours(input_ids[None], **our_inputs(audio, images))
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    # The positions are the thinker's own (get_rope_index), text after each image resuming where it resumes.
    grid = None if images is None else images["image_grid_thw"]
    lengths = None if audio is None else audio["attention_mask"].sum(-1)
    hf_positions, hf_delta = hf.thinker.model.get_rope_index(input_ids[None], grid, None, mask, False, lengths)
    positions, delta = ours.position_ids_for(input_ids[None], grid)
    assert torch.equal(positions, hf_positions.long()) and int(delta[0]) == int(hf_delta[0, 0])


def test_video_positions_and_logits_match_transformers(models):
    """A video beside an image and an audio: its temporal patches position_id_per_seconds x seconds apart."""
    hf, ours, _ = models
    input_ids, audio, images = omni_prompt([(16, 24)], [0.6], seed=60)
    grid = torch.tensor([[2, 4, 6]])  # two temporal patches of 4 x 6 patches: 12 video tokens
    pixels = torch.randn(48, ours.args.vision.patch_dim, generator=torch.Generator().manual_seed(61))
    video = torch.tensor([VISION_START] + [VIDEO] * 12 + [VISION_END, 3, 4])
    input_ids = torch.cat((input_ids, video))
    mask = torch.ones(1, len(input_ids), dtype=torch.long)
    seconds = torch.tensor([2.0])
    with torch.no_grad():
        expected = hf.thinker(input_ids=input_ids[None], attention_mask=mask, pixel_values_videos=pixels,
                              video_grid_thw=grid, video_second_per_grid=seconds, **hf_inputs(audio, images)).logits
        got = ours(input_ids[None], videos=VideoInputs(pixels, grid, [2.0]), **our_inputs(audio, images))
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    hf_positions, hf_delta = hf.thinker.model.get_rope_index(
        input_ids[None], images["image_grid_thw"], grid, mask, False, audio["attention_mask"].sum(-1), seconds)
    positions, delta = ours.position_ids_for(input_ids[None], images["image_grid_thw"], videos=VideoInputs(
        pixels, grid, [2.0]))
    assert torch.equal(positions, hf_positions.long()) and int(delta[0]) == int(hf_delta[0, 0])
    # The video's tokens are the 16th to 5th from the end, 6 per temporal patch: the second starts 2 s x 25 later.
    assert int(positions[0, 0, -9]) - int(positions[0, 0, -15]) == 2 * 25
    with pytest.raises(ValueError, match="not a whole number"):
        ours.position_ids_for(input_ids[None], images["image_grid_thw"], videos=VideoInputs(pixels, grid, [0.3]))


def test_left_padded_batch_with_audio_in_both_rows(models):
    hf, ours, _ = models
    first, audio_a, images = omni_prompt([(16, 24)], [0.7], seed=50)
    second, audio_b, _ = omni_prompt([], [1.4], seed=51, text=2)
    width = max(len(first), len(second))
    input_ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, ids in enumerate((first, second)):
        input_ids[row, width - len(ids):] = ids
        mask[row, width - len(ids):] = 1
    features = [AudioInputs.from_extractor(a["input_features"], a["attention_mask"]) for a in (audio_a, audio_b)]
    frames = max(f.features.shape[1] for f in features)
    padded = torch.zeros(2, features[0].features.shape[0], frames)
    frame_mask = torch.zeros(2, frames, dtype=torch.long)
    for row, f in enumerate(features):
        padded[row, :, : f.features.shape[1]] = f.features
        frame_mask[row, : f.features.shape[1]] = 1
    with torch.no_grad():
        expected = hf.thinker(input_ids=input_ids, attention_mask=mask, input_features=padded,
                              feature_attention_mask=frame_mask, **hf_inputs(None, images)).logits
        got = ours(input_ids, mask, audios=AudioInputs.concat(features), images=our_inputs(None, images)["images"])
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOLERANCE, rtol=0)


def test_packed_row_of_prompts_with_audio_matches_their_own_forwards(models):
    """The update's form: prompts (with completions) end to end in one row, their features from PromptVisions."""
    _, ours, _ = models
    prompts = [omni_prompt([(16, 24)], [0.6], seed=70), omni_prompt([], [1.2], seed=71), omni_prompt([], [], seed=72)]
    rows, visions, positions = [], [], []
    for input_ids, audio, images in prompts:
        completion = torch.randint(0, AUDIO_PAD, (3,), generator=torch.Generator().manual_seed(len(rows)))
        sequence = torch.cat((input_ids, completion))
        vision = ours.prompt_vision(input_ids, **our_inputs(audio, images)) if audio or images else None
        rows.append(sequence)
        visions.append(vision)
        positions.append(torch.arange(len(sequence)).expand(3, -1) if vision is None
                         else vision.sequence_position_ids(len(sequence)))
    packed = PackedSequences.from_lengths([len(r) for r in rows])
    with torch.no_grad():
        hidden = ours.forward_hidden(torch.cat(rows)[None], position_ids=torch.cat(positions, dim=1)[:, None],
                                     packed=packed, visions=visions).hidden_states[0]
        alone = [ours.forward_hidden(r[None], **our_inputs(a, i)).hidden_states[0]
                 for r, (_, a, i) in zip(rows, prompts)]
    torch.testing.assert_close(hidden, torch.cat(alone), atol=TOLERANCE, rtol=0)


def test_audio_token_count_is_the_processors(models):
    _, ours, _ = models
    for frames in (1, 7, 99, 100, 101, 250, 437):
        tail = frames % 100
        expected = ((((tail - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1) + frames // 100 * 13
        assert audio_token_count(frames, ours.args.audio) == expected


def test_greedy_generation_matches_transformers(models):
    hf, ours, _ = models
    prompts = [omni_prompt([(16, 24)], [0.6], seed=30), omni_prompt([], [1.1], seed=31, text=6),
               omni_prompt([(12, 20)], [], seed=32)]
    expected = []
    for input_ids, audio, images in prompts:
        out = hf.thinker.generate(
            input_ids=input_ids[None], attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, suppress_tokens=SPECIAL,
            eos_token_id=None, pad_token_id=0, **hf_inputs(audio, images),
        )
        expected.append(out[0, len(input_ids):].tolist())
    vision = [ours.prompt_vision(ids, **our_inputs(audio, images)) for ids, audio, images in prompts]
    generation = generate(ours, [ids.tolist() for ids, _, _ in prompts], max_new_tokens=NEW_TOKENS, temperature=0,
                          vision=vision)
    assert generation.tokens == expected
    drawn = {t for tokens in generation.tokens for t in tokens}
    assert not drawn & set(SPECIAL)


def test_saved_checkpoint_loads_in_transformers_with_talker_untouched(models, tmp_path):
    hf, ours, folder = models
    with torch.no_grad():
        ours.layers[0].self_attn.q_proj.weight.add_(0.05)
        ours.lm_head.weight.mul_(1.1)
    try:
        save_pretrained(ours, tmp_path / "saved")
        reloaded = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
        saved = tmp_path / "saved" / "model.safetensors"
        with safe_open(folder / "model.safetensors", "pt") as before, safe_open(saved, "pt") as after:
            assert set(before.keys()) == set(after.keys())
            carried = [k for k in before.keys() if k.startswith(("talker.", "code2wav.", "thinker.audio_tower.",
                                                                 "thinker.visual."))]
            # Bit for bit (as integers, so that NaN bits compare too).
            same = [torch.equal(before.get_tensor(k).view(torch.int32), after.get_tensor(k).view(torch.int32))
                    for k in carried]
            assert carried and all(same)
        config = json.loads((tmp_path / "saved" / "config.json").read_text())
        assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
        assert config["thinker_config"]["audio_token_id"] == AUDIO_PAD
        for key, value in reloaded.talker.state_dict().items():
            assert torch.equal(value, hf.talker.state_dict()[key]), key
        input_ids, audio, images = omni_prompt([(16, 24)], [0.8], seed=40)
        with torch.no_grad():
            expected = reloaded.thinker(input_ids=input_ids[None], attention_mask=torch.ones(1, len(input_ids),
                                        dtype=torch.long), **hf_inputs(audio, images)).logits
            got = ours(input_ids[None], **our_inputs(audio, images))
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
        assert not torch.allclose(reloaded.thinker.lm_head.weight, hf.thinker.lm_head.weight)
    finally:
        with torch.no_grad():
            ours.lm_head.weight.div_(1.1)
            ours.layers[0].self_attn.q_proj.weight.sub_(0.05)
