"""What a run over several GPUs (torchrun ranks) needs of its config: one check for the trainer and the planner."""

from __future__ import annotations

from gspo_engine.config import Config, ConfigError


def check_data_parallel(config: Config, world_size: int) -> None:
    """Each rank samples whole groups and runs the same number of optimizer steps; LoRA runs in one process.

    `world_size`: the torchrun ranks of a run, or the GPUs a plan is made for (one rank per GPU).
    """
    if world_size == 1:
        return
    where = f"on {world_size} GPUs/ranks"
    if config.lora.rank:
        raise ConfigError(f"{where}: LoRA runs on one process and one GPU (lora.rank > 0): launch it without "
                          "torchrun, or plan it with --gpus 1")
    prompts = config.rollout.prompts_per_step
    if prompts % world_size:
        raise ConfigError(f"{where}: rollout.prompts_per_step ({prompts}) must be a multiple of the number of "
                          "ranks: each rank samples all completions of its own prompts")
    per_rank = prompts // world_size * config.rollout.group_size
    if per_rank < config.gspo.num_minibatches:
        raise ConfigError(f"{where}: each rank holds {per_rank} completions, fewer than gspo.num_minibatches "
                          f"({config.gspo.num_minibatches}); raise rollout.prompts_per_step")


def check_expert_parallel(config: Config, world_size: int, num_experts: int, is_moe: bool) -> None:
    """distributed.expert_parallel divides the ranks (GPUs) and the experts of every MoE layer, on a MoE model.

    One process (or a plan for one GPU) holds every expert: like the rest of the distributed
    section, the setting does not apply there.
    """
    ep = config.distributed.expert_parallel
    if ep == 1 or world_size == 1:
        return
    key = f"distributed.expert_parallel ({ep})"
    if not is_moe:
        raise ConfigError(f"{key}: expert parallelism splits the experts of a MoE model; "
                          f"{config.model.name_or_path} has none (set it to 1)")
    if world_size % ep:
        raise ConfigError(f"{key} must divide the number of ranks/GPUs ({world_size}): the ranks form groups of "
                          f"{ep} that split the experts (launch with torchrun --nproc_per_node a multiple of {ep}, "
                          "or set it to 1: every rank then holds every expert)")
    if num_experts % ep:
        raise ConfigError(f"{key} must divide the number of experts ({num_experts}): every rank of a group holds "
                          "the same number of them")
