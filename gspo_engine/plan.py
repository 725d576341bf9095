"""`--dry-run`: what a config will do, from config.json alone (no weights are read).

Model shapes come from the model folder's config.json; when the folder is not on this machine
and its name is a released Qwen3 model, from that release's published config.json, so a plan can
be made before downloading anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gspo_engine.config import Config
from gspo_engine.lora import adapter_parameter_count
from gspo_engine.model import ModelArgs, Qwen3Model
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


@dataclass
class Plan:
    model_source: str
    architecture: str
    total_params: int
    active_params: int  # per token: shared weights plus top-k experts
    tokens_per_step: int  # prompts x group x (prompt + completion), at the configured maxima
    sequences_per_minibatch: int
    train_memory_gib: float  # weights + gradients + AdamW states of what is trained, fp32 master copy
    trainable_params: int  # all of them, or the LoRA adapters'
    lora_rank: int = 0
    base_dtype: str = "fp32"  # of the frozen base weights under LoRA

    def lines(self) -> list[str]:
        lines = [
            f"model: {self.model_source} ({self.architecture})",
            f"parameters: {_count(self.total_params)} total, {_count(self.active_params)} active per token",
        ]
        if self.lora_rank:
            share = self.trainable_params / self.total_params
            lines.append(f"trained: LoRA rank {self.lora_rank}, {_count(self.trainable_params)} adapter "
                         f"parameters ({share:.2%} of the model)")
        lines += [
            f"tokens per step (at most): {self.tokens_per_step:,}",
            f"sequences per minibatch: {self.sequences_per_minibatch}",
        ]
        if self.lora_rank:
            lines.append(f"frozen {self.base_dtype} base weights + adapters, their gradients and AdamW states: "
                         f"{self.train_memory_gib:.2f} GiB (before activations and the KV cache)")
        else:
            lines.append(f"weights + gradients + AdamW states: {self.train_memory_gib:.2f} GiB "
                         "(fp32 master weights, before activations and the KV cache)")
        return lines


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def plan_model_args(name_or_path: str) -> tuple[ModelArgs, str]:
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


def make_plan(config: Config) -> Plan:
    args, source = plan_model_args(config.model.name_or_path)
    with torch.device("meta"):
        model = Qwen3Model(args)
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up", "down")))
    active = total - expert_params
    if args.is_moe:
        active += expert_params * args.num_experts_per_tok // args.num_experts
    rollout = config.rollout
    sequences = rollout.prompts_per_step * rollout.group_size
    tokens = sequences * (config.data.max_prompt_tokens + rollout.max_new_tokens)
    per_minibatch = -(-sequences // config.gspo.num_minibatches)
    # fp32 weights (4 B) + fp32 gradients (4 B) + AdamW exp_avg and exp_avg_sq (8 B) per trained parameter.
    if not config.lora.rank:
        return Plan(source, args.architecture, total, active, tokens, per_minibatch, total * 16 / 2**30, total)
    # LoRA: gradients and optimizer states for the adapters only; the base is stored, not trained.
    adapters = adapter_parameter_count(model, config.lora)
    base_bytes = 2 if config.lora.base_bf16 else 4
    memory = (total * base_bytes + adapters * 16) / 2**30
    return Plan(source, args.architecture, total + adapters, active, tokens, per_minibatch, memory, adapters,
                config.lora.rank, "bf16" if config.lora.base_bf16 else "fp32")
