"""Tiny random Qwen3 / Qwen3-MoE checkpoints written by transformers itself, for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

DENSE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)
MOE = dict(DENSE, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, num_hidden_layers=3)


def build_hf_model(moe: bool = False, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random fp32 transformers model; the router and norms are randomised too so that every weight matters."""
    torch.manual_seed(seed)
    if moe:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**(MOE | overrides)))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**(DENSE | overrides)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    return model.eval()


def save_hf_model(model: torch.nn.Module, path: Path, **save_kwargs) -> Path:
    model.save_pretrained(path, **save_kwargs)
    return path
