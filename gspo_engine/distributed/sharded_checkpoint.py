"""Sharded model and optimizer state with torch.distributed.checkpoint (DCP).

Every rank writes its own shards of every tensor into `checkpoint-STEP/sharded/` (plus DCP's
metadata, which records each tensor's global shape and which slice each file holds), so a save
costs each rank only its share. Loading reads whatever slices the loading ranks' shards need:
a checkpoint saved on 2 ranks resumes on 1, 2 or 8, and a plain process without a process group
reads it whole. Keys are the model's own parameter names (FSDP2 keeps them), the optimizer's
states are keyed by the same names.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

SHARDED_DIR = "sharded"


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / SHARDED_DIR / ".metadata").is_file()


def save_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank calls it with the same folder (on a file system they all see)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=Path(folder) / SHARDED_DIR)


def load_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load the model (and optimizer) state of `folder` into this rank's shards, whatever the saving world size."""
    path = Path(folder) / SHARDED_DIR
    no_dist = not (dist.is_available() and dist.is_initialized())  # one process reads every shard
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path, no_dist=no_dist)
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole model's weights on rank 0's CPU (an empty dict on the other ranks)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def broadcast_full_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Collective: rank 0's whole-model `state_dict` into every rank's shards (the others pass {})."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state_dict, options=options)
