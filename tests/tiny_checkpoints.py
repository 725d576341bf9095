"""Tiny random Qwen3 / Qwen3-MoE checkpoints written by transformers itself, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

VOCAB = 96
DENSE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    # Larger than the usual 0.02 so that logits are O(1) and a wrong weight shows.
    initializer_range=0.1,
)
MOE = DENSE | dict(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, num_hidden_layers=3)


def build_hf_model(moe: bool = False, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random fp32 transformers model in eval mode; norms are randomised too so that every weight matters."""
    torch.manual_seed(seed)
    if moe:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**(MOE | overrides)))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**(DENSE | overrides)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


def save_hf_model(model: torch.nn.Module, path: Path, **save_kwargs) -> Path:
    model.save_pretrained(path, **save_kwargs)
    return path


def left_padded_batch(batch: int = 3, seq: int = 12, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask and position_ids [B, T] of a left-padded batch, row b padded by 2b tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        attention_mask[row, : 2 * row] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def write_released_config(path: Path, config: dict) -> None:
    """Rewrite path/config.json in the key spelling of released Qwen3 checkpoints (transformers 4)."""
    released = dict(config)
    released["torch_dtype"] = released.pop("dtype", "bfloat16")
    if "num_local_experts" in released:
        released["num_experts"] = released.pop("num_local_experts")
    rope = dict(released.pop("rope_parameters", None) or {})
    released["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", "default")
    released["rope_scaling"] = None if rope_type == "default" else rope
    (path / "config.json").write_text(json.dumps(released, indent=2))
