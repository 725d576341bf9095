"""The KV cache budget a run's rollouts decode under: rollout.kv_cache_gb, or what the planner leaves free."""

from __future__ import annotations

import copy
from pathlib import Path

from gspo_engine.config import Config
from gspo_engine.planner.machine import machine_for
from gspo_engine.planner.plan import make_plan


def rollout_kv_cache_gb(config: Config, world_size: int, model_folder: Path | str) -> float | None:
    """rollout.kv_cache_gb when set; else the budget the memory plan of this machine leaves for the KV cache
    (decimal GB), or None when every sequence of a step fits at once (as on a CPU with the host's memory).

    model_folder: the checkpoint the run loads, whose config.json gives the shapes.
    """
    if config.rollout.kv_cache_gb is not None:
        return config.rollout.kv_cache_gb
    planned = copy.deepcopy(config)
    planned.model.name_or_path = str(model_folder)
    machine = machine_for(planned, world_size, None, None)
    rollout = make_plan(machine.config, machine.count, machine.memory_gb, machine.device).memory.rollout
    return rollout.kv_cache_gb if rollout.reduced else None
