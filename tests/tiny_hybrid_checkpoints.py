"""Tiny random Qwen3-Next / Qwen3.5 text checkpoints written by transformers itself, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_5 import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
)
from transformers.models.qwen3_5_moe import (
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
)

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=6,
    linear_num_key_heads=2,
    linear_num_value_heads=4,  # two value heads per key head, as in Qwen3-Next-80B-A3B (16 key, 32 value)
    # Larger than the usual 0.02 so that logits are O(1) and a wrong weight shows.
    initializer_range=0.15,
)
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=16)
VARIANTS = {
    # Qwen3-Next: layer_types from full_attention_interval (layers 3 and 7 full), MoE on every layer.
    "next": (Qwen3NextConfig, Qwen3NextForCausalLM, dict(num_hidden_layers=8, intermediate_size=40, **MOE)),
    # Qwen3-Next with an explicit layer layout, a dense layer (mlp_only_layers) and a tied head.
    "next-layer-types": (Qwen3NextConfig, Qwen3NextForCausalLM, dict(
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
        mlp_only_layers=[1], intermediate_size=40, tie_word_embeddings=True, **MOE,
    )),
    "qwen3.5": (Qwen3_5TextConfig, Qwen3_5ForCausalLM, dict(intermediate_size=40, tie_word_embeddings=True)),
    "qwen3.5-moe": (Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM, dict(**MOE)),
}
# Released Qwen3.5 checkpoints are image-text models: the language model above inside, a (tiny) vision tower beside.
MULTIMODAL = {
    "qwen3.5-vl": (Qwen3_5Config, Qwen3_5ForConditionalGeneration, "qwen3.5"),
    "qwen3.5-moe-vl": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, "qwen3.5-moe"),
}
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
              num_position_embeddings=16)
MTP_TENSORS = ("mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.mlp.experts.0.up_proj.weight")


def build_hybrid_model(variant: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random fp32 transformers model in eval mode; norms, A_log and dt_bias randomised too so that every weight matters."""
    torch.manual_seed(seed)
    if variant in MULTIMODAL:
        config_class, model_class, text_variant = MULTIMODAL[variant]
        text = COMMON | VARIANTS[text_variant][2] | overrides
        model = model_class(config_class(text_config=text, vision_config=VISION, tie_word_embeddings=False))
        with torch.no_grad():  # the image-text model initialises from its own config's defaults
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0, text["initializer_range"])
    else:
        config_class, model_class, extra = VARIANTS[variant]
        model = model_class(config_class(**(COMMON | extra | overrides)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def save_hybrid_checkpoint(
    model: torch.nn.Module, path: Path, shards: bool = False, mtp: bool = False, interval_only: bool = False
) -> Path:
    """model.save_pretrained(path), in several shards if `shards`.

    mtp: add multi-token-prediction tensors (`mtp.*`, which the model does not use) in a file of
    their own, as released Qwen3-Next checkpoints have them. interval_only: config.json with
    full_attention_interval instead of layer_types, as Qwen3-Next-80B-A3B's.
    """
    model.save_pretrained(path, max_shard_size="20KB" if shards else "5GB")
    if mtp:
        generator = torch.Generator().manual_seed(7)
        tensors = {key: torch.randn(3, 5, generator=generator) for key in MTP_TENSORS}
        save_file(tensors, path / "mtp.safetensors", metadata={"format": "pt"})
        index_path = path / "model.safetensors.index.json"
        if index_path.exists():
            index = json.loads(index_path.read_text())
        else:
            index = {"metadata": {}, "weight_map": {}}
            from safetensors import safe_open

            with safe_open(path / "model.safetensors", framework="pt") as f:
                index["weight_map"] = {key: "model.safetensors" for key in f.keys()}
        index["weight_map"].update({key: "mtp.safetensors" for key in tensors})
        index_path.write_text(json.dumps(index, indent=2))
    if interval_only:
        config = json.loads((path / "config.json").read_text())
        del config["layer_types"]
        config["full_attention_interval"] = 4
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def mtp_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())["weight_map"]
    else:
        index = dict.fromkeys(MTP_TENSORS, "model.safetensors")
    out = {}
    for key in MTP_TENSORS:
        with safe_open(path / index[key], framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def padded_batch(batch: int = 3, seq: int = 21, seed: int = 1, side: str = "left") -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask and position_ids [B, T], row b padded by 3b tokens on `side`."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        if side == "left":
            attention_mask[row, : 3 * row] = 0
        else:
            attention_mask[row, seq - 3 * row :] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids
