"""Model shapes for the planner, from config.json alone: the model folder's, an embedded tiny model's, or,
when the folder is not on this machine and its name is a released Qwen3 model, that release's
published config.json, so a plan can be made before downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from gspo_engine.model import ModelArgs
from gspo_engine.tiny import TINY_MODELS, tiny_model_args

_QWEN3_VOCAB = 151936
_DENSE_4B = dict(
    architectures=["Qwen3ForCausalLM"], vocab_size=_QWEN3_VOCAB, hidden_size=2560, intermediate_size=9728,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, tie_word_embeddings=True, torch_dtype="bfloat16",
)
_MOE_30B = dict(
    architectures=["Qwen3MoeForCausalLM"], vocab_size=_QWEN3_VOCAB, hidden_size=2048, intermediate_size=6144,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    norm_topk_prob=True, torch_dtype="bfloat16",
)
# Shapes of released checkpoints, as their config.json files publish them.
RELEASED_SHAPES: dict[str, dict] = {
    "Qwen3-4B": _DENSE_4B,
    "Qwen3-4B-Instruct-2507": _DENSE_4B | {"max_position_embeddings": 262144},
    "Qwen3-30B-A3B": _MOE_30B,
    "Qwen3-Coder-30B-A3B-Instruct": _MOE_30B | {"max_position_embeddings": 262144},
    "Qwen3-235B-A22B": _MOE_30B | dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=94, num_attention_heads=64,
        moe_intermediate_size=1536,
    ),
}


def plan_model_args(name_or_path: str) -> tuple[ModelArgs, str]:
    """The shapes of `model.name_or_path` and where they come from, as the plan prints it."""
    if name_or_path in TINY_MODELS:
        return tiny_model_args(name_or_path), f"{name_or_path} (embedded, random)"
    folder = Path(name_or_path)
    if (folder / "config.json").is_file():
        return ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text())), str(folder)
    if folder.name in RELEASED_SHAPES:
        return ModelArgs.from_hf_config(RELEASED_SHAPES[folder.name]), (
            f"{folder} (not on this machine: shapes of the released {folder.name})"
        )
    raise ValueError(
        f"model.name_or_path: {name_or_path} has no config.json and is not a released model this planner knows "
        f"({', '.join(RELEASED_SHAPES)}) nor an embedded one ({', '.join(TINY_MODELS)})"
    )

