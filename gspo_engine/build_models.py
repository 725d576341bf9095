"""The models a run trains: the policy (whole, sharded over ranks, or frozen with LoRA adapters) and the
frozen reference policy the KL term needs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from gspo_engine.config import Config
from gspo_engine.distributed.expert_sharding import expert_mesh, shard_experts
from gspo_engine.distributed.parallel import data_parallel_mesh, parallelize
from gspo_engine.distributed.rules import check_expert_parallel
from gspo_engine.distributed.runtime import Runtime
from gspo_engine.distributed.sharded_checkpoint import broadcast_full_state_dict, is_sharded_checkpoint
from gspo_engine.errors import TrainingError
from gspo_engine.hf_checkpoint import load_pretrained, read_config
from gspo_engine.hub import ResolvedModel, download_model, parse_model_id
from gspo_engine.lora import add_lora, is_adapter_folder, load_adapters
from gspo_engine.model import Qwen3Model, build_model
from gspo_engine.tiny import TINY_MODELS, build_tiny_checkpoint


def model_source(config: Config, output_dir: Path) -> ResolvedModel:
    """The checkpoint folder the run starts from (with the Hub repository and commit it came from): an
    embedded tiny model, built in output_dir on first use; a local folder; or a Hub id's snapshot in the
    Hugging Face cache, downloaded when it is not there. A local folder wins over a Hub id of its name."""
    name, revision = config.model.name_or_path, config.model.revision
    if name in TINY_MODELS:
        folder = output_dir / name
        if not (folder / "config.json").is_file():
            build_tiny_checkpoint(name, folder, seed=config.model.seed)
        return ResolvedModel(folder)
    folder = Path(name)
    local = (folder / "config.json").is_file()
    model_id = parse_model_id(name)
    if not local and model_id is not None and not folder.exists():
        return download_model(model_id, revision)
    if not local:
        raise TrainingError(
            f"model.name_or_path: {name} is neither a model folder with config.json, nor a Hugging Face Hub id "
            f"ORG/NAME[@REVISION], nor one of {', '.join(TINY_MODELS)}"
        )
    if revision is not None:
        raise TrainingError(f"model.revision: {revision} picks a revision of a Hub model; {name} is a local folder")
    return ResolvedModel(folder)


@dataclass
class RunModels:
    policy: Qwen3Model
    reference: Qwen3Model | None  # None without a KL term, and with LoRA (the policy with its adapters off)


def build_models(config: Config, runtime: Runtime, device: torch.device, precision: str, source: Path,
                 resume_from: Path | None) -> RunModels:
    """The policy and reference of a run that starts from `source` or resumes from `resume_from`.

    A sharded checkpoint's weights and optimizer are read later (load_sharded) over the model built here.
    """
    lora = config.lora if config.lora.rank else None
    if resume_from is not None and is_adapter_folder(resume_from) != (lora is not None):
        held = "LoRA adapters" if lora is None else "full weights, not LoRA adapters"
        raise TrainingError(f"{resume_from} holds {held}; resume it with the lora settings it was trained with")
    resume_sharded = resume_from is not None and is_sharded_checkpoint(resume_from)
    # One process holds every expert (the distributed section does not apply to it).
    expert_parallel = config.distributed.expert_parallel if runtime.world_size > 1 else 1
    if expert_parallel > 1:
        args = read_config(source)
        check_expert_parallel(config, runtime.world_size, args.num_experts, args.is_moe)

    def load(folder: Path, dtype: torch.dtype = torch.float32, on: torch.device = device) -> Qwen3Model:
        return configure(load_pretrained(folder, dtype=dtype, device=on), config, source)

    def load_sharded_over_ranks() -> Qwen3Model:
        # Rank 0 reads the checkpoint on its CPU; the other ranks build on the meta device (no
        # memory) and receive only their shards, so no GPU ever holds the whole model.
        if runtime.is_main:
            model = load(source, on=torch.device("cpu"))
            full_state = model.state_dict()
        else:
            args = read_config(source)
            args.dtype = torch.float32
            with torch.device("meta"):
                model = configure(build_model(args), config, source)
            full_state = {}
        if expert_parallel > 1:  # each rank keeps its block of experts; FSDP2 shards the rest
            shard_experts(model, expert_mesh(runtime.world_size, expert_parallel, device))
        parallelize(model, data_parallel_mesh(runtime, device), bf16_compute=precision == "bf16-mixed",
                    reshard_after_forward=config.distributed.reshard_after_forward)
        model.to_empty(device=device)
        broadcast_full_state_dict(model, full_state)
        return model

    if runtime.distributed:
        if resume_from is not None and not resume_sharded:
            raise TrainingError(
                f"{resume_from} was written by a single-process run (Hugging Face weights, a whole optimizer "
                f"state); resume it without torchrun, or start a distributed run from its weights with "
                f"model.name_or_path={resume_from}"
            )
        policy = load_sharded_over_ranks()
    elif lora is not None:
        if lora.base_bf16 and precision != "bf16-mixed":
            raise TrainingError("lora.base_bf16 needs train.precision bf16-mixed")
        # The frozen starting model with trainable adapters: fresh ones (B = 0), or a checkpoint's.
        policy = load(source, torch.bfloat16 if lora.base_bf16 else torch.float32)
        add_lora(policy, lora)
        if resume_from is not None:
            load_adapters(policy, resume_from)
    else:
        policy = load(source if resume_sharded or resume_from is None else resume_from)

    reference = None
    if config.gspo.beta > 0 and lora is None:
        # The starting model, frozen: the KL keeps the policy near it.
        if runtime.distributed:
            reference = load_sharded_over_ranks()
        else:
            reference = load(source) if resume_from is not None else copy.deepcopy(policy)
        reference.requires_grad_(False).eval()
    return RunModels(policy, reference)


def configure(model: Qwen3Model, config: Config, source: Path) -> Qwen3Model:
    """The run's model options on a loaded model: activation checkpointing, the router aux loss, a frozen
    vision tower, a frozen audio encoder."""
    model.args.source_path = str(source)  # tokenizer files travel with every save
    model.args.activation_checkpointing = config.model.activation_checkpointing
    if model.args.vision is not None:
        # A frozen tower and its mergers get no gradients, hence no optimizer state.
        model.visual.requires_grad_(not config.model.freeze_vision_tower)
        model.visual.activation_checkpointing = config.model.activation_checkpointing
    if model.args.audio is not None:
        # A Qwen3-Omni thinker's audio encoder is never trained: RL with text rewards trains the language model.
        model.audio_tower.requires_grad_(False)
    model.args.router_aux_loss = config.model.router_aux_loss_coef > 0 and model.args.is_moe
    if model.args.router_aux_loss:
        model.args.router_aux_loss_coef = config.model.router_aux_loss_coef
    return model
