"""`gspo-engine export`: a run's model as a folder other tools load.

Full fine-tuning runs hold Hugging Face checkpoints already; LoRA runs hold PEFT adapter folders,
which are copied as they are (PEFT loads them onto the transformers base model) or, with merge,
folded into their base and written as a Hugging Face checkpoint that transformers and vLLM load.
A distributed run's checkpoints hold sharded DCP files: they are read whole in this one process
(whatever the number of ranks that wrote them) and written as a Hugging Face checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from gspo_engine.hf_checkpoint import CONFIG_FILE, load_pretrained, read_config, save_pretrained
from gspo_engine.distributed.sharded_checkpoint import is_sharded_checkpoint, load_sharded
from gspo_engine.lora import export_merged, is_adapter_folder
from gspo_engine.model import Qwen3Model, build_model
from gspo_engine.run_checkpoint import STATE_FILE, list_checkpoints


def model_folder_of(path: str | Path) -> Path:
    """The model in `path`: the folder itself when it holds one, else the run's final/ or latest checkpoint."""
    path = Path(path)
    candidates = [path, path / "final", *reversed(list_checkpoints(path))]
    for folder in candidates:
        if (folder / CONFIG_FILE).is_file() or is_adapter_folder(folder):
            return folder
    raise FileNotFoundError(f"{path} holds no model: no config.json or adapter_config.json, no final/, no checkpoint")


def check_output(source: Path, folder: Path, output: Path, force: bool) -> None:
    """Refuse an `output` whose replacement would lose anything: the source itself, a folder holding it,
    or (without force) any folder that already holds files."""
    source, folder, output = source.resolve(), folder.resolve(), output.resolve()
    # A run folder may hold the export (runs/x/hf); the model folder itself may not.
    if output in (source, folder) or output in source.parents or output in folder.parents or folder in output.parents:
        raise ValueError(f"--output {output} would overwrite {folder}, the model being exported (from {source}); "
                         "choose a folder outside it")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        held = sorted(child.name for child in output.iterdir())
        raise FileExistsError(
            f"--output {output} already holds {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}; "
            "choose an empty or new folder, or pass --force to replace what it holds"
        )


def export_model(source: str | Path, output: str | Path, merge: bool, force: bool = False) -> Path:
    """Write the model of `source` (a model folder or a run folder) to `output`; returns the folder exported.

    `output` must not overlap what is exported; one that holds files is replaced only with force.
    """
    folder = model_folder_of(source)
    check_output(Path(source), folder, Path(output), force)
    if is_adapter_folder(folder) and merge:
        export_merged(folder, output)
    elif is_adapter_folder(folder):
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(folder, output, ignore=shutil.ignore_patterns(STATE_FILE))
    elif is_sharded_checkpoint(folder):
        save_pretrained(load_sharded_model(folder), output)
    else:
        save_pretrained(load_pretrained(folder), output)
    return folder


def load_sharded_model(folder: str | Path) -> Qwen3Model:
    """The whole model of a distributed run's checkpoint, in fp32 on the CPU of this process."""
    args = read_config(folder)
    args.dtype = torch.float32
    args.source_path = str(folder)  # its tokenizer files are copied along
    model = build_model(args)  # initialised, then overwritten: every weight is in the checkpoint
    load_sharded(folder, model, optimizer=None)
    return model
