"""LoRA on the vision tower of a tiny Qwen3-VL made by transformers: adapters on the blocks' attention and MLP
linears get gradients, the KL reference computes its own image features, the merged export and PEFT's own loading give transformers the adapted model's logits,
and a frozen tower refuses them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_vl_checkpoints import IMAGE, build_hf_vl_model, prompt_with_images

from gspo_engine.config import LORA_VISION_TARGETS, ConfigError, LoraConfig, config_from_dict
from gspo_engine.hf_checkpoint import load_pretrained
from gspo_engine.lora import adapter_parameter_count, add_lora, adapters_disabled, export_merged, save_adapters
from gspo_engine.lora.adapters import named_adapter_parameters
from gspo_engine.model import ImageInputs
from gspo_engine.scoring import tower_features_recomputed

TOLERANCE = 2e-4
TARGETS = ["q_proj", "v_proj", *LORA_VISION_TARGETS]


def hf_logits(hf, input_ids, pixel_values, grid):
    with torch.no_grad():
        return hf(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                  mm_token_type_ids=(input_ids == IMAGE).int()).logits


def logits_of(model, input_ids, vision):
    positions = vision.sequence_position_ids(len(input_ids))[:, None]
    hidden = model.forward_hidden(input_ids[None], position_ids=positions, visions=[vision]).hidden_states
    return F.linear(hidden, model.lm_head_weight)


def test_tower_adapters_train_and_export_to_transformers(tmp_path):
    hf = build_hf_vl_model(seed=3)
    hf.save_pretrained(tmp_path / "base")
    ours = load_pretrained(tmp_path / "base", dtype=torch.float32)
    plain_count = adapter_parameter_count(ours, LoraConfig(rank=4, targets=TARGETS))
    lora = LoraConfig(rank=4, targets=TARGETS)
    add_lora(ours, lora)
    adapted = {name.partition(".lora_")[0] for name, _ in named_adapter_parameters(ours)}
    depth = ours.args.vision.depth
    tower = {name for name in adapted if name.startswith("visual.")}
    assert tower == {f"visual.blocks.{i}.{leaf}" for i in range(depth) for leaf in LORA_VISION_TARGETS}
    assert sum(p.numel() for _, p in named_adapter_parameters(ours)) == plain_count
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at first: make every adapter change its output
        for name, parameter in named_adapter_parameters(ours):
            if ".lora_B." in name:
                parameter.normal_(0, 0.2)

    input_ids, pixel_values, grid = prompt_with_images([(16, 24), (30, 12)], seed=5)
    images = ImageInputs(pixel_values, grid)
    ours(input_ids[None], images=images).square().mean().backward()
    for name, parameter in named_adapter_parameters(ours):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for name, p in ours.visual.named_parameters() if ".lora_" not in name)
    with torch.no_grad():
        expected = ours(input_ids[None], images=images)
        with adapters_disabled(ours):
            base = ours(input_ids[None], images=images)
    assert (expected - base).abs().max() > 1e-2  # the adapters matter
    # The KL reference (adapters off) computes its own image features, not the adapted tower's stored ones.
    samples = [SimpleNamespace(vision=ours.prompt_vision(input_ids, images))]
    with torch.no_grad(), adapters_disabled(ours):
        stale = logits_of(ours, input_ids, samples[0].vision)
        with tower_features_recomputed(ours, samples):
            reference = logits_of(ours, input_ids, samples[0].vision)
    torch.testing.assert_close(reference, base, atol=1e-5, rtol=0)
    assert (stale - base).abs().max() > 1e-3

    save_adapters(ours, lora, tmp_path / "adapter")
    export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = type(hf).from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(merged, input_ids[None], pixel_values, grid), expected,
                               atol=TOLERANCE, rtol=0)
    # PEFT adapts transformers' model with the same folder: its keys and target_modules fit that model.
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(type(hf).from_pretrained(tmp_path / "base", dtype=torch.float32),
                                           tmp_path / "adapter").eval()
    torch.testing.assert_close(hf_logits(peft_model, input_ids[None], pixel_values, grid), expected,
                               atol=TOLERANCE, rtol=0)


def test_tower_targets_need_a_trained_tower():
    with pytest.raises(ConfigError, match="model.freeze_vision_tower"):
        config_from_dict({"lora": {"rank": 4, "targets": ["q_proj", "attn.qkv"]}})
    config = config_from_dict({"model": {"freeze_vision_tower": False}, "lora": {"rank": 4, "targets": ["attn.qkv"]}})
    assert config.lora.targets == ["attn.qkv"]
