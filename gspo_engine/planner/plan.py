"""make_plan: what a config will do (parameters, tokens per step) and the memory it needs per GPU."""

from __future__ import annotations

import torch

from gspo_engine.config import Config
from gspo_engine.lora import adapter_parameter_count
from gspo_engine.model import build_model
from gspo_engine.planner.memory_model import GIB, Cluster, ModelSizes, memory_plan, model_sizes
from gspo_engine.planner.released_shapes import plan_model_args
from gspo_engine.planner.report import Plan


def make_plan(config: Config, gpus: int = 1, gpu_memory_gb: float = 80.0, device: str = "GPU") -> Plan:
    """The plan of `config` on `gpus` cards of `gpu_memory_gb` decimal GB each (or, with device "CPU", one
    process with that much host memory), from the model's shapes alone."""
    cluster = Cluster(gpus, gpu_memory_gb, device)
    args, source = plan_model_args(config.model.name_or_path)
    with torch.device("meta"):
        model = build_model(args)
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up", "down")))
    active = total - expert_params
    if args.is_moe:
        active += expert_params * args.num_experts_per_tok // args.num_experts
    rollout = config.rollout
    sequences = rollout.prompts_per_step * rollout.group_size
    tokens = sequences * (config.data.max_prompt_tokens + rollout.max_new_tokens)
    per_minibatch = -(-sequences // config.gspo.num_minibatches)
    # A frozen vision tower (model.freeze_vision_tower) is held, not trained: no gradients, no AdamW states.
    frozen_tower = args.vision is not None and config.model.freeze_vision_tower
    sizes = model_sizes(model, frozen_tower)
    if not config.lora.rank:
        # fp32 weights (4 B) + fp32 gradients (4 B) + AdamW exp_avg and exp_avg_sq (8 B) per trained parameter.
        # Qwen3-Omni's audio encoder never trains (build_models.configure).
        trainable = total - (sizes.tower if frozen_tower else 0) - sizes.audio_tower
        memory = memory_plan(config, args, sizes, trainable, cluster)
        return Plan(source, args.architecture, total, active, tokens, per_minibatch,
                    (total * 4 + trainable * 12) / GIB, trainable, memory=memory)
    # LoRA: gradients and optimizer states for the adapters (and lora.modules_to_save's copies) only;
    # the base is stored, not trained.
    adapters = adapter_parameter_count(model, config.lora)
    sizes = ModelSizes(total + adapters, sizes.blocks, sizes.matmul, sizes.layer_experts, sizes.all_experts,
                       sizes.block_experts, sizes.tower, sizes.tower_units, sizes.audio_tower)
    base_bytes = 2 if config.lora.base_bf16 else 4
    memory = memory_plan(config, args, sizes, adapters, cluster)
    return Plan(source, args.architecture, total + adapters, active, tokens, per_minibatch,
                (total * base_bytes + adapters * 16) / GIB, adapters, config.lora.rank,
                "bf16" if config.lora.base_bf16 else "fp32", memory=memory)
