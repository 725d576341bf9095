"""Training Qwen3-VL: packed scoring and gradients with images against transformers, prompts with images in
datasets (and their errors), the resolution, the frozen or trained tower in the trainer, the CLI, tiny-vl."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_vl_checkpoints import IMAGE, build_hf_vl_model, prompt_with_images

from gspo_engine.batching import Sample
from gspo_engine.cli import main
from gspo_engine.config import config_from_dict, load_config
from gspo_engine.data import DataError, PromptDataset, read_rows
from gspo_engine.distributed.runtime import Runtime
from gspo_engine.hf_checkpoint import hf_pieces, load_pretrained
from gspo_engine.model import ImageInputs
from gspo_engine.model.vision_args import VisionArgs
from gspo_engine.scoring import score_samples
from gspo_engine.step_context import StepContext
from gspo_engine.tiny import build_tiny_checkpoint
from gspo_engine.tokenizer import load_tokenizer
from gspo_engine.trainer import GSPOTrainer
from gspo_engine.vision_prompts import ImageProcessing
from gspo_engine.vision_task import COLOURS, draw_colour, generate_vision_rows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = build_hf_vl_model(moe=True, seed=5)
    folder = tmp_path_factory.mktemp("qwen3vl_train")
    hf.save_pretrained(folder)
    return hf, load_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return build_tiny_checkpoint("tiny-vl", tmp_path_factory.mktemp("tiny-vl") / "tiny-vl")


def vl_samples(model, count_images: list[list[tuple[int, int]]], completion: int = 5) -> list[Sample]:
    """One sample per prompt, each with a random completion, and its PromptVision."""
    generator = torch.Generator().manual_seed(30)
    samples = []
    for index, sizes in enumerate(count_images):
        if sizes:
            ids, pixels, grid = prompt_with_images(sizes, seed=31 + index)
            vision = model.prompt_vision(ids, ImageInputs(pixels, grid))
        else:
            ids, vision = torch.randint(0, IMAGE, (7,), generator=generator), None
        samples.append(Sample(ids.tolist(), torch.randint(0, IMAGE, (completion + index,), generator=generator).tolist(),
                              advantage=1.0 - index, vision=vision))
    return samples


def hf_completion_logps(hf, sample: Sample) -> torch.Tensor:
    tokens = torch.tensor(sample.prompt_ids + sample.completion_ids)[None]
    kwargs = {}
    if sample.vision is not None:
        images = sample.vision.images
        kwargs = dict(pixel_values=images.pixel_values, image_grid_thw=images.grid_thw,
                      mm_token_type_ids=(tokens == IMAGE).int())
    logps = hf(input_ids=tokens, **kwargs).logits.log_softmax(-1)
    prompt = len(sample.prompt_ids)
    return logps[0, prompt - 1 : -1].gather(-1, tokens[0, prompt:, None])[:, 0]


def test_packed_scoring_matches_transformers(models):
    hf, ours = models
    samples = vl_samples(ours, [[(16, 24)], [], [(12, 20), (8, 8)], [(16, 24)]])
    samples[3].vision = samples[0].vision  # a group's completions share one PromptVision
    samples[3].prompt_ids = samples[0].prompt_ids
    # A budget that puts several samples, with and without images, into one packed row.
    context = StepContext(Runtime(), torch.device("cpu"), "fp32", pad_id=0, temperature=1.0, micro_batch_tokens=90)
    score_samples(context, ours, samples, "old_logps")
    with torch.no_grad():
        for sample in samples:
            torch.testing.assert_close(sample.old_logps, hf_completion_logps(hf, sample), atol=2e-4, rtol=0)


@pytest.mark.parametrize("freeze", [True, False], ids=["tower_frozen", "tower_trained"])
def test_packed_gradients_match_transformers(models, freeze):
    hf, ours = models
    samples = vl_samples(ours, [[(16, 24)], [(12, 20), (8, 8)], []])
    context = StepContext(Runtime(), torch.device("cpu"), "fp32", pad_id=0, temperature=1.0, micro_batch_tokens=10_000)
    weights = [torch.randn(len(s.completion_ids), generator=torch.Generator().manual_seed(40 + i))
               for i, s in enumerate(samples)]
    for model, tower in ((hf, hf.model.visual), (ours, ours.visual)):
        model.zero_grad(set_to_none=True)
        tower.requires_grad_(not freeze)
    try:
        sum((hf_completion_logps(hf, s) * w).sum() for s, w in zip(samples, weights)).backward()
        batch = context.collate(samples)
        hidden = context.forward(ours, batch).hidden_states
        rows, targets = batch.scored_rows(hidden)
        logps = torch.log_softmax(rows[0] @ ours.lm_head_weight.T, -1).gather(-1, targets[0, :, None])[:, 0]
        (logps * torch.cat(weights)).sum().backward()
        for name, parameter in ours.named_parameters():
            if name.startswith("visual.") and freeze:
                assert parameter.grad is None, name
                continue
            piece = hf_pieces(name, parameter, ours.args)[0]
            theirs = hf.get_parameter(piece.hf_key).grad
            grad = parameter.grad if theirs.shape == parameter.shape else piece.to_hf(parameter.grad)
            torch.testing.assert_close(grad, theirs, atol=1e-4, rtol=1e-4, msg=name)
    finally:
        hf.model.visual.requires_grad_(True)
        ours.visual.requires_grad_(True)


def save_image(path, colour=(200, 30, 30), size=(40, 24)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_dataset_rows_with_images(tiny_vl, tmp_path):
    tokenizer = load_tokenizer(tiny_vl)
    vision = VisionArgs.from_hf_config(json.loads((tiny_vl / "config.json").read_text()))
    processing = ImageProcessing(tiny_vl, vision, resolution=32)
    (tmp_path / "pictures").mkdir()
    save_image(tmp_path / "pictures" / "a.png")
    save_image(tmp_path / "pictures" / "b.png", size=(64, 64))
    rows = [
        {"prompt": "<colour>=", "images": "pictures/a.png", "answer": "1"},
        {"prompt": "<image>1<image>=", "images": ["pictures/a.png", "pictures/b.png"], "answer": "2"},
        {"prompt": "<copy>12=", "answer": "12"},
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = PromptDataset.from_rows(read_rows(data), tokenizer, vision=processing, image_root=tmp_path)
    pad = vision.image_token_id
    first, second, third = dataset.examples
    # 32 x 32 pixels at most: 4 x 4 patches of 8, 2 x 2 merged tokens per image.
    assert first.token_ids.count(pad) == 4 and second.token_ids.count(pad) == 8 and pad not in third.token_ids
    assert first.token_ids[0] == vision.vision_start_token_id and len(second.images) == 2
    assert "images" not in first.columns and first.columns["answer"] == "1"
    assert second.token_ids.index(pad) < second.token_ids.index(tokenizer.convert_tokens_to_ids("1"))
    # A larger cap gives more visual tokens for the larger image (the small one keeps its size, rounded to 32 x 32).
    wide = PromptDataset.from_rows(read_rows(data), tokenizer, image_root=tmp_path,
                                   vision=ImageProcessing(tiny_vl, vision, resolution=64, min_resolution=16))
    assert wide.examples[1].token_ids.count(pad) == 4 + 16


def test_bad_images_are_errors_naming_file_and_line(tiny_vl, tmp_path):
    tokenizer = load_tokenizer(tiny_vl)
    vision = ImageProcessing(tiny_vl, VisionArgs.from_hf_config(json.loads((tiny_vl / "config.json").read_text())))
    save_image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    data = tmp_path / "prompts.jsonl"

    def error(rows, model_vision=vision):
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(DataError) as caught:
            PromptDataset.from_rows(read_rows(data), tokenizer, vision=model_vision, image_root=tmp_path)
        return str(caught.value)

    ok = {"prompt": "<colour>=", "images": "ok.png"}
    message = error([ok, {"prompt": "<colour>=", "images": ["missing.png"]}])
    assert f"{data}:2" in message and "missing.png" in message and "does not exist" in message
    message = error([ok, ok, {"prompt": "<colour>=", "images": "broken.png"}])
    assert f"{data}:3" in message and "broken.png" in message and "cannot be read" in message
    assert "2 <image> places for 1 images" in error([{"prompt": "<image><image>=", "images": "ok.png"}])
    assert "no vision tower" in error([ok], model_vision=None)


def vl_trainer(tmp_path, tiny_vl, **sections):
    data = {
        "model": {"name_or_path": str(tiny_vl)},
        "data": {"dataset": "builtin_vision", "builtin": {"tasks": ["colour", "count"], "num_rows": 32},
                 "vision_resolution": 32},
        "rollout": {"prompts_per_step": 3, "group_size": 4, "max_new_tokens": 3},
        "gspo": {"eps_low": 0.2, "eps_high": 0.28, "num_minibatches": 2},
        "optim": {"learning_rate": 1e-2},
        "train": {"steps": 2},
        "output_dir": str(tmp_path / "run"),
    }
    for section, values in sections.items():
        data[section] = data.get(section, {}) | values
    return GSPOTrainer(config_from_dict(data), echo=lambda *a, **k: None)


@pytest.mark.parametrize("freeze", [True, False], ids=["tower_frozen", "tower_trained"])
def test_trainer_freezes_or_trains_the_tower(tiny_vl, tmp_path, monkeypatch, freeze):
    trainer = vl_trainer(tmp_path, tiny_vl, model={"freeze_vision_tower": freeze})
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    encoded = []
    original = type(model).encode_images
    monkeypatch.setattr(type(model), "encode_images",
                        lambda self, images: encoded.append(torch.is_grad_enabled()) or original(self, images))
    for _ in range(2):
        trainer.train_step()
    tower = [name for name in before if name.startswith("visual.")]
    changed = [name for name in tower if not torch.equal(before[name], model.get_parameter(name))]
    text_changed = [n for n in before if not n.startswith("visual.") and not torch.equal(before[n], model.get_parameter(n))]
    assert text_changed
    if freeze:
        assert changed == []
        assert all(id(p) not in {id(q) for q in trainer.optimizer.state} for p in model.visual.parameters())
        # Once per prompt per step, without gradients: the group, the scoring and the update reuse them.
        assert encoded == [False] * 6
    else:
        assert set(changed) == set(tower)
        assert encoded.count(False) == 6 and encoded.count(True) >= 6  # the update computes them again per minibatch


def test_cli_vision_flags_and_generate_with_an_image(tiny_vl, tmp_path):
    config = load_config("configs/tiny-vl.yaml", ["model.freeze_vision_tower=false", "data.vision_resolution=336"])
    assert not config.model.freeze_vision_tower and config.data.vision_resolution == 336
    result = CliRunner().invoke(main, ["train", "configs/tiny-vl.yaml", "--freeze_vision_tower", "false",
                                       "--vision_resolution", "336", "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "freeze_vision_tower: false" in result.output and "vision_resolution: 336" in result.output
    image, _ = draw_colour(random.Random(0))
    image.save(tmp_path / "shape.png")
    result = CliRunner().invoke(main, ["generate", str(tiny_vl), "--prompt", "<colour>=", "--image",
                                       str(tmp_path / "shape.png"), "--temperature", "0", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("[0] '<colour>=' -> ")
    result = CliRunner().invoke(main, ["generate", str(tiny_vl), "--prompt", "<colour>=", "--image",
                                       str(tmp_path / "none.png")])
    assert result.exit_code != 0 and "none.png does not exist" in result.output


def test_vision_tasks_draw_their_answers():

    rows = generate_vision_rows(("colour", "count"), 40, seed=3)
    assert rows == generate_vision_rows(("colour", "count"), 40, seed=3)  # PIL images compare by their pixels
    assert {row["task"] for row in rows} == {"colour", "count"}
    for row in rows:
        pixels = set(row["images"][0].getdata()) - {(255, 255, 255)}
        if row["task"] == "colour":
            assert pixels == {COLOURS[row["answer"]]}
        else:
            assert 1 <= int(row["answer"]) <= 4 and pixels <= set(COLOURS.values())
    image, answer = draw_colour(random.Random(1))
    assert answer in COLOURS


@pytest.mark.slow
def test_tiny_vl_config_learns(tmp_path):
    config = load_config("configs/tiny-vl.yaml", [f"output_dir={tmp_path / 'run'}", "train.steps=80"])
    summary = GSPOTrainer(config, echo=lambda *a, **k: None).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward_mean"] for r in records[:10]) / 10
    last = sum(r["reward_mean"] for r in records[-10:]) / 10
    assert last > first + 0.4, (first, last)
    assert summary is not None


# The image and text parts of a message as Qwen3-VL's chat template renders them (its role markers left out).
PARTS_TEMPLATE = (
    "{%- for m in messages %}{%- if m.content is string %}{{ m.content }}{%- else %}{%- for p in m.content %}"
    "{%- if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{%- elif p.type == 'text' %}{{ p.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
)


def test_chat_messages_with_image_parts(tiny_vl, tmp_path):
    tokenizer = load_tokenizer(tiny_vl)
    tokenizer.chat_template = PARTS_TEMPLATE
    vision = VisionArgs.from_hf_config(json.loads((tiny_vl / "config.json").read_text()))
    processing = ImageProcessing(tiny_vl, vision, resolution=32)
    save_image(tmp_path / "a.png")
    rows = [
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "1"}, {"type": "image"},
                                                 {"type": "text", "text": "<colour>="}]}], "images": ["a.png"]},
        {"prompt": [{"role": "user", "content": "<colour>="}], "images": ["a.png"]},
    ]
    dataset = PromptDataset.from_rows(rows, tokenizer, vision=processing, image_root=tmp_path)
    parts, plain = (example.token_ids for example in dataset.examples)
    image_tokens = [vision.vision_start_token_id] + [vision.image_token_id] * 4 + [vision.vision_end_token_id]
    one, colour, equals = (tokenizer.convert_tokens_to_ids(t) for t in ("1", "<colour>", "="))
    assert parts == [one, *image_tokens, colour, equals]
    assert plain == [*image_tokens, colour, equals]  # string content: the images go in front of the text
    bad = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], "images": ["a.png"]}]
    with pytest.raises(DataError, match="2 image parts for 1 images"):
        PromptDataset.from_rows(bad, tokenizer, vision=processing, image_root=tmp_path)
