"""LoRA on the hybrid models: adapters on the Gated DeltaNet projections and the shared expert, read by PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from gspo_engine.config import LoraConfig
from gspo_engine.hf_checkpoint import load_pretrained
from gspo_engine.lora import adapter_parameters, add_lora, export_merged, load_adapted, save_adapters
from tiny_hybrid_checkpoints import VOCAB, build_hybrid_model, save_hybrid_checkpoint

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
EVERY_TARGET = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router", "experts",
                "in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]


@pytest.mark.parametrize("variant, targets, adapted", [
    ("next", None, ["linear_attn.in_proj_qkvz", "linear_attn.out_proj", "self_attn.q_proj",
                    "mlp.shared_expert.up_proj", "mlp.expert_lora"]),
    ("qwen3.5", EVERY_TARGET, ["linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                               "linear_attn.in_proj_a", "linear_attn.out_proj", "mlp.gate_proj"]),
    ("qwen3.5-moe", EVERY_TARGET, ["linear_attn.in_proj_qkv", "mlp.router", "mlp.shared_expert.down_proj"]),
    # the released image-text Qwen3.5: adapters on its language model, under model.language_model.
    ("qwen3.5-moe-vl", None, ["linear_attn.in_proj_qkv", "mlp.shared_expert.up_proj", "mlp.expert_lora"]),
])
def test_peft_loads_our_hybrid_adapters_and_the_merged_export_matches(tmp_path, variant, targets, adapted):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_hybrid_checkpoint(build_hybrid_model(variant, num_hidden_layers=4), tmp_path / "base")
    model = load_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(rank=4, alpha=8.0) if targets is None else LoraConfig(rank=4, alpha=8.0, targets=targets)
    add_lora(model, lora)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for module in adapted:
        assert any(f".{module}." in name for name in names), module
    if targets is None:  # the default leaves the DeltaNet's per-head gates and the router alone
        assert not any("in_proj_ba" in name or "mlp.router" in name for name in names)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in adapter_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        ours = model(IDS)
    save_adapters(model, lora, tmp_path / "adapters")
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert {"out_proj"} <= set(config["target_modules"])
    base_class = type(build_hybrid_model(variant)) if variant.endswith("-vl") else AutoModelForCausalLM
    peft_model = PeftModel.from_pretrained(base_class.from_pretrained(base), tmp_path / "adapters").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, ours, atol=2e-4, rtol=0)
        torch.testing.assert_close(load_adapted(tmp_path / "adapters")(IDS), ours, atol=0, rtol=0)
    export_merged(tmp_path / "adapters", tmp_path / "merged")
    merged = base_class.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours, atol=2e-4, rtol=0)
