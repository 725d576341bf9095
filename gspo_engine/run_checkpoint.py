"""Training checkpoints: `checkpoint-STEP/` folders that the trainer resumes from.

A single-process run's folder holds the model as Hugging Face safetensors (save_pretrained; with
LoRA the adapters as a PEFT adapter folder), plus trainer_state.pt: optimizer, LR scheduler, RNG
states, data position, step and counters. A distributed run's folder holds the model and
optimizer as sharded DCP files under sharded/ (each rank writes its shards), config.json and the
tokenizer files, and trainer_state.pt without the optimizer; `gspo-engine export` turns it into
a Hugging Face folder. A folder is complete or absent: it is written under a temporary name and
renamed into place, so a crash mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import copy
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gspo_engine.config import LoraConfig
from gspo_engine.distributed.runtime import Runtime
from gspo_engine.distributed.sharded_checkpoint import full_model_state_dict, is_sharded_checkpoint, load_sharded, save_sharded
from gspo_engine.hf_checkpoint import save_pretrained, write_model_files
from gspo_engine.lora import save_adapters
from gspo_engine.model import Qwen3Model, build_model

STATE_FILE = "trainer_state.pt"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in `output_dir`, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _PATTERN.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    output_dir: str | Path, step: int, save_weights: Callable[[Path], None], trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint-STEP atomically (save_weights(folder) writes the model), then keep the newest `keep_last`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"checkpoint-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        model_folder = staging / "checkpoint"
        save_weights(model_folder)
        torch.save(trainer_state | {"rng": rng_state()}, model_folder / STATE_FILE)
        _publish(model_folder, target, keep_last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(complete: Path, target: Path, keep_last: int) -> None:
    """Rename a complete checkpoint folder into place, then keep only the newest `keep_last`."""
    if target.exists():
        shutil.rmtree(target)
    complete.rename(target)
    for old in list_checkpoints(target.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(
    output_dir: str | Path, step: int, save_shards: Callable[[Path], None], model_args, trainer_state: dict[str, Any],
    keep_last: int, runtime,
) -> Path:
    """Collective form of save_checkpoint: every rank writes its shards into one staging folder
    (named by the step, so all ranks agree on it), then rank 0 writes the rest and renames it into place."""
    output_dir = Path(output_dir)
    target = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.partial"
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    runtime.barrier()
    save_shards(staging)
    runtime.barrier()
    if runtime.is_main:
        write_model_files(model_args, torch.float32, staging)  # the shards hold the fp32 master weights
        torch.save(trainer_state | {"rng": rng_state()}, staging / STATE_FILE)
        _publish(staging, target, keep_last)
    runtime.barrier()
    return target


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint: {STATE_FILE} is missing")
    return torch.load(path, map_location="cpu", weights_only=False)


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None for "none", the newest for "auto", else the given folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"checkpoint.resume auto (--resume): {output_dir} holds no checkpoint to resume from; "
                "start without --resume, or point output_dir at the run to continue"
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint.resume: {resume} is not a training checkpoint ({STATE_FILE} missing)")
    return path


def save_model(model: Qwen3Model, folder: Path, runtime: Runtime, lora: LoraConfig | None) -> None:
    """A Hugging Face checkpoint, or with LoRA a PEFT adapter folder (export --merge merges it).

    A sharded model is gathered whole on rank 0's CPU, which writes it (collective).
    """
    if runtime.distributed:
        full_state = full_model_state_dict(model)
        if runtime.is_main:
            with torch.device("meta"):
                whole = build_model(copy.copy(model.args))
            whole.load_state_dict(full_state, assign=True)
            save_pretrained(whole, folder)
        runtime.barrier()
    elif lora is None:
        save_pretrained(model, folder)
    else:
        save_adapters(model, lora, folder)


def save_run_checkpoint(output_dir: Path, step: int, model: Qwen3Model, optimizer: torch.optim.Optimizer,
                        trainer_state: dict[str, Any], keep_last: int, runtime: Runtime,
                        lora: LoraConfig | None) -> Path:
    """checkpoint-STEP of a run: sharded (DCP) on several ranks, Hugging Face or PEFT files in one process."""
    if runtime.distributed:
        return save_sharded_checkpoint(
            output_dir, step, lambda folder: save_sharded(folder, model, optimizer), model.args, trainer_state,
            keep_last, runtime,
        )
    state = trainer_state | {"optimizer": optimizer.state_dict()}
    return save_checkpoint(output_dir, step, lambda folder: save_model(model, folder, runtime, lora), state, keep_last)


def restore_run_checkpoint(folder: Path, model: Qwen3Model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint's optimizer (and a sharded one's weights) and RNG states; the rest of its trainer state."""
    state = load_trainer_state(folder)
    if is_sharded_checkpoint(folder):
        load_sharded(folder, model, optimizer)
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state


# What a run writes into its output_dir, besides the model folder a tiny run starts from.
RUN_OUTPUTS = ("metrics.jsonl", "curves.png", "config.yaml", "final")


def earlier_run_outputs(output_dir: Path) -> list[Path]:
    """The files and folders of an earlier run in `output_dir`: its metrics, config, final/ and checkpoints."""
    if not output_dir.is_dir():
        return []
    found = [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    return found + list_checkpoints(output_dir)


def remove_stale_staging(output_dir: Path) -> list[Path]:
    """Delete the staging folders of saves that never finished (a run killed mid-save), and say which.

    Checkpoints and final/ are written under a hidden name (.checkpoint-STEP.*, .final.*) and
    renamed when complete; one left behind is never complete and can be as large as the model.
    """
    if not output_dir.is_dir():
        return []
    stale = [path for path in output_dir.iterdir()
             if path.is_dir() and (path.name.startswith(".checkpoint-") or path.name.startswith(".final."))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale
