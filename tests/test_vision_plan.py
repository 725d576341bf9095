"""The planner's vision tower terms (gspo_engine/planner/vision.py) against what the code allocates: the tensors the
tower saves for its backward, the visual tokens the image processor gives at data.vision_resolution, what a
prompt's PromptVision holds, and the states of a frozen or trained tower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from test_plan import measure_phases
from transformers import Qwen2VLImageProcessorPil

from gspo_engine.build_models import configure
from gspo_engine.config import config_from_dict, load_config
from gspo_engine.model import build_model
from gspo_engine.model.qwen3_vl import ImageInputs
from gspo_engine.model.vision import VisionTower, tower_parts
from gspo_engine.model.vision_args import VisionArgs
from gspo_engine.planner import make_plan
from gspo_engine.planner.activations import resolve_compute
from gspo_engine.planner.memory_model import model_sizes
from gspo_engine.planner.vision import (
    image_bytes_per_token,
    prompts_in_micro_batch,
    tower_patch_bytes,
    visual_tokens_per_image,
    visual_tokens_per_prompt,
)
from gspo_engine.tiny import tiny_model_args
from gspo_engine.vision_prompts import ImageProcessing

CONFIGS = Path(__file__).parent.parent / "configs"
# Depth 3 with two DeepStack mergers; 4-pixel patches.
VISION = VisionArgs(depth=3, hidden_size=64, intermediate_size=176, num_heads=4, out_hidden_size=48,
                    num_position_embeddings=16, deepstack_visual_indexes=[0, 1], patch_size=4)
REGIMES = ["fp32", "autocast over fp32 weights", "bf16 weights (FSDP2)"]


def compute_of(regime: str):
    precision = "fp32" if regime == "fp32" else "bf16-mixed"
    return resolve_compute(config_from_dict({"train": {"precision": precision}}), 2 if regime.startswith("bf16") else 1)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointing"])
@pytest.mark.parametrize("regime", REGIMES)
def test_tower_bytes_are_what_autograd_saves(regime, checkpointing):
    """tower_patch_bytes against the tensors the tower saves for its backward, per patch, for two images."""
    torch.manual_seed(0)
    tower = VisionTower(VISION)
    tower.activation_checkpointing = checkpointing
    tower.to(torch.bfloat16 if regime.startswith("bf16") else torch.float32)
    grid = torch.tensor([[1, 18, 20], [1, 10, 14]])
    patches = int((grid[:, 1] * grid[:, 2]).sum())
    pixels = torch.randn(patches, VISION.patch_dim)  # the processor's fp32 values, held by the prompt anyway
    weight_sizes = {p.numel() for p in tower.parameters()}  # weights and autocast's casts of them
    skipped = {p.untyped_storage().data_ptr() for p in tower.parameters()} | {pixels.untyped_storage().data_ptr()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in skipped and tensor.numel() not in weight_sizes:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=regime.startswith("autocast")):
            tower(pixels, grid)
    # On the CPU a bf16 LayerNorm keeps its mean and rstd in bf16; CUDA's keeps them in fp32, as planned.
    assert sum(saved.values()) == pytest.approx(tower_patch_bytes(VISION, compute_of(regime), checkpointing) * patches,
                                                rel=0.02)


def test_visual_tokens_are_what_the_processor_gives(tmp_path):
    """At data.vision_resolution N an image brings at most N^2 / (patch x merge)^2 visual tokens, exactly that many
    for a square N x N one."""
    Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2).save_pretrained(tmp_path)
    for resolution in (24, 40, 64):
        processing = ImageProcessing(tmp_path, VISION, resolution)
        bound = visual_tokens_per_image(VISION, resolution)
        for height, width in [(resolution, resolution), (3 * resolution, resolution), (37, 91), (500, 300)]:
            image = Image.new("RGB", (width, height), "white")
            [tokens] = processing.token_counts(processing.inputs([image]))
            assert tokens <= bound
            if height == width == resolution:
                assert tokens == bound


def test_visual_tokens_per_prompt_are_the_most_a_prompt_holds():
    for per_image in (1, 5, 196):
        for prompt in (3, 10, 50, 1024):
            tokens, images = visual_tokens_per_prompt(per_image, prompt)
            # Any number of images, each at most per_image tokens, with their start and end markers.
            best = max(min(n * per_image, prompt - 2 * n) for n in range(1, prompt // 2 + 1))
            assert tokens == best and min(images * per_image, prompt - 2 * images) == best
    assert visual_tokens_per_prompt(None, 1024) == (1022, 1)


def test_prompts_in_a_micro_batch_are_those_consecutive_samples_span():
    for group in (1, 3, 16):
        samples = [index // group for index in range(10 * group)]  # each prompt's group together, as the trainer
        for size in range(1, 4 * group):
            most = max(len(set(samples[start:start + size])) for start in range(len(samples) - size + 1))
            assert prompts_in_micro_batch(size, group, 10) == most


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-mixed"])
def test_a_prompt_vision_holds_what_is_planned(autocast):
    args = tiny_model_args("tiny-vl")
    torch.manual_seed(0)
    model = build_model(args).eval()
    vision = args.vision
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    patches = int((grid[:, 1] * grid[:, 2]).sum())
    tokens = patches // vision.spatial_merge_size**2
    input_ids = torch.tensor([0] + [vision.image_token_id] * 6 + [1, vision.image_token_id, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        prompt = model.prompt_vision(input_ids, ImageInputs(torch.randn(patches, vision.patch_dim), grid))
    held = [prompt.images.pixel_values, prompt.features.embeds, *prompt.features.deepstack]
    compute = compute_of("autocast over fp32 weights" if autocast else "fp32")
    assert sum(t.nbytes for t in held) == tokens * image_bytes_per_token(vision, compute)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trained"])
def test_a_frozen_tower_has_no_gradients_or_adamw_states(frozen):
    config = load_config(CONFIGS / "tiny-vl.yaml", [f"model.freeze_vision_tower={str(frozen).lower()}"])
    args = tiny_model_args("tiny-vl")
    model = configure(build_model(args), config, Path("."))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tower = sum(p.numel() for p in model.visual.parameters())
    plan = make_plan(config)
    assert plan.trainable_params == trained == plan.total_params - (tower if frozen else 0)
    assert plan.memory.states.gradients == 4 * trained and plan.memory.states.optimizer == 8 * trained
    assert plan.memory.vision.parameters == tower
    assert (plan.memory.training.tower_activations > 0) == (not frozen)
    # The tower's FSDP2 units cover it, each parameter once.
    units = model_sizes(model).tower_units
    assert sum(units) == tower and len(units) == len(tower_parts(model.visual))


def test_the_report_states_the_visual_tokens_and_the_tower():
    config = load_config(CONFIGS / "gspo_qwen3_vl.yaml")
    text = "\n".join(make_plan(config, gpus=2, gpu_memory_gb=141).lines())
    assert "visual tokens per image: at most 196" in text
    assert "no gradients or AdamW states" in text and "prompts' pixel values + image features" in text
    trained = make_plan(load_config(CONFIGS / "gspo_qwen3_vl.yaml", ["model.freeze_vision_tower=false"]),
                        gpus=2, gpu_memory_gb=141)
    assert "vision tower activations" in "\n".join(trained.lines())
    frozen = make_plan(config, gpus=2, gpu_memory_gb=141)
    tower = frozen.memory.vision.parameters
    assert trained.memory.states.gradients - frozen.memory.states.gradients == pytest.approx(4 * tower / 2)


def test_estimate_against_measured_peaks_with_the_tower_frozen_and_trained(tmp_path, monkeypatch):
    """One GSPO step of tiny-vl on the CPU (tests/test_plan.py's tracker) against the plan, phase by phase, with the
    tower frozen and trained; the trained tower's extra (gradients, AdamW states, activations) as measured."""
    torch.set_num_threads(1)
    peaks = {}
    for frozen in (True, False):
        config = load_config(CONFIGS / "tiny-vl.yaml", [
            "train.steps=1", "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=30",
            "gspo.num_minibatches=1", "gspo.micro_batch_tokens=4096", "data.builtin.num_rows=64",
            "data.max_prompt_tokens=8", "train.precision=fp32", f"model.freeze_vision_tower={str(frozen).lower()}",
            f"output_dir={tmp_path / str(frozen)}"])
        with monkeypatch.context() as patched:
            measured = measure_phases(config, patched)
        memory = make_plan(config).memory
        assert memory.vision.tokens_per_prompt == 4  # one 32 x 32 image, as the prompts hold
        estimated = {"rollout": memory.rollout_peak, "scoring": memory.scoring.peak(memory.states),
                     "training": memory.training.peak(memory.states)}
        for phase, value in estimated.items():
            assert value == pytest.approx(measured[phase], rel=0.1), (frozen, phase)
        peaks[frozen] = measured["training"], estimated["training"]
    measured_extra, estimated_extra = (peaks[False][i] - peaks[True][i] for i in (0, 1))
    assert estimated_extra == pytest.approx(measured_extra, rel=0.3)


def test_the_omni_audio_encoder_is_planned_frozen():
    """Qwen3-Omni's audio encoder never trains: no gradients or AdamW states in the plan, as in the configured model."""
    config = load_config(CONFIGS / "tiny-omni.yaml")
    model = configure(build_model(tiny_model_args("tiny-omni")), config, Path("."))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    audio = sum(p.numel() for p in model.audio_tower.parameters())
    plan = make_plan(config)
    assert audio > 0 and model_sizes(model).audio_tower == audio
    assert plan.trainable_params == trained
    assert plan.memory.states.gradients == 4 * trained and plan.memory.states.optimizer == 8 * trained
