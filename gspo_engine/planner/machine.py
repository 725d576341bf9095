"""The machine a dry run plans for: the GPUs asked for, else the one the run would use."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from gspo_engine.config import Config
from gspo_engine.device import resolve_device


@dataclass(frozen=True)
class Machine:
    description: str  # one line for the user: what is planned and why
    config: Config  # the config as the run would resolve its device
    count: int  # GPUs, or 1 process on a CPU
    memory_gb: float  # per GPU, or the host's memory
    device: str  # "GPU" or "CPU"


def host_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def machine_for(config: Config, world_size: int, gpus: int | None, gpu_memory_gb: float | None) -> Machine:
    """GPUs named by --gpus / --gpu-memory-gb; else this machine as the run would use it (its GPUs
    under torchrun's WORLD_SIZE, or its CPU and host memory when the run would not use a GPU)."""
    if gpus is not None or gpu_memory_gb is not None:
        count, memory = gpus or world_size, gpu_memory_gb or 80.0
        return Machine(f"planned for {count} x {memory:g} GB GPUs (as asked)", config, count, memory, "GPU")
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        memory = props.total_memory / 1e9
        return Machine(f"planned for this machine: {world_size} x {props.name} ({memory:.0f} GB)", config,
                       world_size, memory, "GPU")
    on_cpu = copy.deepcopy(config)
    on_cpu.train.device = "cpu"  # train.precision auto resolves as the run would: fp32
    memory = round(host_memory_gb(), 1)
    shared = f", shared by {world_size} processes" if world_size > 1 else ""
    return Machine(
        f"planned for this machine's CPU ({memory:.0f} GB of memory{shared}): no GPU is visible, so the run computes "
        "on the CPU; --gpus N --gpu-memory-gb G plans GPUs instead", on_cpu, world_size,
        round(memory / world_size, 1), "CPU",
    )
