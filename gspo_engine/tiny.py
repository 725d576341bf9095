"""The embedded tiny models: small random Qwen3 / Qwen3-MoE checkpoints with the digit-task tokenizer.

They are written as ordinary Hugging Face folders (config.json, model.safetensors, tokenizer
files) and then loaded like any released checkpoint, so the tiny default trains through exactly
the code a real model uses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from gspo_engine.checkpoint import save_pretrained
from gspo_engine.model import ModelArgs, Qwen3Model
from gspo_engine.tasks import save_tiny_tokenizer, tiny_vocabulary

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=128, rope_theta=10000.0, dtype=torch.float32,
)
TINY_MODELS: dict[str, dict] = {
    "tiny-moe": dict(_COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                     router_aux_loss_coef=0.001),
    "tiny-dense": dict(_COMMON, tie_word_embeddings=True),
}
INIT_STD = 0.02  # Qwen3's initializer_range


def tiny_model_args(name: str) -> ModelArgs:
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    return ModelArgs(vocab_size=len(tiny_vocabulary()), **TINY_MODELS[name])


def init_weights(model: Qwen3Model, seed: int) -> None:
    """Every matrix N(0, INIT_STD), every norm weight 1, from one seeded generator (same seed, same model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * INIT_STD)
            else:
                parameter.fill_(1.0)


def build_tiny_checkpoint(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the random tiny model `name` (with its tokenizer) as a checkpoint folder."""
    args = tiny_model_args(name)
    model = Qwen3Model(args)
    init_weights(model, seed)
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        save_tiny_tokenizer(tokenizer_folder, model_max_length=args.max_position_embeddings)
        model.args.source_path = tokenizer_folder  # save_pretrained copies the tokenizer files from here
        save_pretrained(model, folder)
    return Path(folder)
