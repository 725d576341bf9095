"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

The keys are those PEFT gives the transformers Qwen3 / Qwen3-MoE model, so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` loads them:

    ours                                         PEFT, on the transformers model
    layers.{i}.self_attn.q_proj.lora_A.default.weight  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
    layers.{i}.mlp.router.lora_A.default.weight  base_model.model.model.layers.{i}.mlp.gate.lora_A.weight
    layers.{i}.mlp.expert_lora.gate_up_A [E, r, H]   ...layers.{i}.mlp.experts.base_layer.lora_A.weight [E*r, H]
    layers.{i}.mlp.expert_lora.gate_up_B [E, 2I, r]  ...layers.{i}.mlp.experts.base_layer.lora_B.weight [2I, r*E]
    layers.{i}.mlp.expert_lora.down_A / down_B       ...layers.{i}.mlp.experts.lora_A / lora_B.weight
    embed_tokens.modules_to_save.default.weight  base_model.model.model.embed_tokens.weight
    lm_head.modules_to_save.default.weight       base_model.model.lm_head.weight

transformers' router and experts are parameters, not nn.Linear modules; PEFT adapts them through
`target_parameters` (its ParamWrapper), nesting the down_proj wrapper around the gate_up_proj one
(hence `base_layer`). Its expert factors are stacked expert-major in A (row e*r + j) and rank-major
in B (column j*E + e). ParamWrapper has no dropout, so with router or expert adapters the saved
lora_dropout is 0: dropout only matters in training, and our own config keeps the value.

A saved module (modules_to_save) is stored whole under its module's key. With tied embeddings the
trained embedding is also the lm_head: the folder says ensure_weight_tying, which makes PEFT tie
its lm_head copy to the embedding copy, and holds the matrix under the lm_head key too, as PEFT
itself saves it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gspo_engine.hf_checkpoint import COPIED_FILES, load_pretrained, save_pretrained
from gspo_engine.config import LORA_MODULES_TO_SAVE, LoraConfig
from gspo_engine.lora.adapters import (
    add_lora,
    linear_targets,
    merge_lora,
    named_adapter_parameters,
    require_peft,
    saved_module_names,
)
from gspo_engine.model import Qwen3Model
from gspo_engine.model.args import NEXT_ARCHITECTURE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_ROOT = "base_model.model."  # PEFT's wrapper around the transformers model; its language model follows
_LM_HEAD_KEY = "base_model.model.lm_head.weight"
_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
_ROUTER_PARAMETER = "mlp.gate.weight"
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _expert_factor(kind: str) -> tuple[Callable, Callable]:
    """(ours -> PEFT, PEFT -> ours) for an expert factor: A [E, r, K] <-> [E*r, K], B [E, M, r] <-> [M, r*E]."""
    if kind == "A":
        return (lambda t: t.reshape(-1, t.shape[-1]),
                lambda t, shape: t.reshape(shape))
    return (lambda t: t.permute(1, 2, 0).reshape(t.shape[1], -1),
            lambda t, shape: t.reshape(shape[1], shape[2], shape[0]).permute(2, 0, 1))


def _prefix(model: Qwen3Model) -> str:
    """PEFT's prefix of the language model's modules: base_model.model.model. (model.language_model. inside an
    image-text Qwen3.5)."""
    return _PEFT_ROOT + model.args.hf_prefix


def _peft_name(name: str, prefix: str) -> tuple[str, Callable, Callable]:
    """PEFT's key of our adapter parameter `name`, with the layout conversions both ways."""
    identity = (lambda t: t, lambda t, shape: t)
    if ".modules_to_save." in name:
        module, _, leaf = name.partition(".modules_to_save.")
        key = f"{module}.{leaf.partition('.')[2]}"  # "lm_head.modules_to_save.default.weight" -> "lm_head.weight"
        return (_PEFT_ROOT if module == "lm_head" else prefix) + key, *identity
    if ".expert_lora." in name:
        module, _, leaf = name.rpartition(".expert_lora.")
        tensor, kind = leaf.rsplit("_", 1)  # "gate_up_A" -> ("gate_up", "A")
        wrapper = "experts.base_layer" if tensor == "gate_up" else "experts"
        return (f"{prefix}{module}.{wrapper}.lora_{kind}.weight", *_expert_factor(kind))
    key = name.replace(".default.", ".").replace(".mlp.router.", ".mlp.gate.")
    if name.startswith("visual."):  # the vision tower sits beside the language model, at model.visual.*
        return (_PEFT_ROOT + "model." + key, *identity)
    return (prefix + key, *identity)


def adapter_state_dict(model: Qwen3Model) -> dict[str, torch.Tensor]:
    """PEFT key -> adapter tensor (CPU, contiguous), in PEFT's layout."""
    out = {}
    for name, parameter in named_adapter_parameters(model):
        key, to_peft, _ = _peft_name(name, _prefix(model))
        out[key] = to_peft(parameter.detach()).to("cpu").contiguous()
    if _ties_saved_embedding(model):
        out[_LM_HEAD_KEY] = out[_prefix(model) + "embed_tokens.weight"].clone()  # safetensors stores no shared tensors
    return dict(sorted(out.items()))


def _ties_saved_embedding(model: Qwen3Model) -> bool:
    """Whether the model trains a copy of an embedding that is also its lm_head."""
    return model.lm_head is None and any(".modules_to_save." in name for name, _ in named_adapter_parameters(model))


OMNI_NOT_ADAPTED = r"(.*\.)?(audio_tower|talker|code2wav)(\..*)?"


def _peft_config(model: Qwen3Model, lora: LoraConfig, base_path: str):
    linear = linear_targets(model, lora.targets)
    modules = [name for name in linear if name != "router"]
    parameters = []
    if model.args.architecture == NEXT_ARCHITECTURE:
        # PEFT reads a Qwen3-Next adapter's target_modules gate_proj / up_proj / down_proj as the per-expert
        # projections of transformers 4 and retargets them at the grouped experts (doubling the rank). The
        # shared expert's (and dense layers') projections are therefore named as parameters, which PEFT
        # adapts alike (ParamWrapper, the same lora_A / lora_B keys) and leaves as they are.
        mlp = [name for name in modules if name in _MLP_PROJECTIONS]
        modules = [name for name in modules if name not in _MLP_PROJECTIONS]
        parameters += [f"{name}.weight" for name in mlp]
    if "router" in linear:
        parameters.append(_ROUTER_PARAMETER)
    if "experts" in lora.targets and model.args.is_moe:
        parameters += _EXPERT_PARAMETERS
    saved = saved_module_names(model, lora.modules_to_save)
    # Loaded onto a full Qwen3-Omni model, target names such as q_proj would also match the audio encoder, the
    # talker and code2wav, none of which trains.
    excluded = OMNI_NOT_ADAPTED if getattr(model, "audio_tower", None) is not None else None
    return require_peft().LoraConfig(
        r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=0.0 if parameters else lora.dropout,
        target_modules=modules or None, target_parameters=parameters or None, exclude_modules=excluded, bias="none",
        modules_to_save=saved or None, ensure_weight_tying=bool(saved) and model.lm_head is None,
        task_type="CAUSAL_LM", base_model_name_or_path=base_path,
    )


def save_adapters(model: Qwen3Model, lora: LoraConfig, path: str | os.PathLike) -> None:
    """Write the adapters of `model` as a PEFT adapter folder, with the tokenizer files of its base.

    The base is model.args.source_path (recorded as base_model_name_or_path). Written next to
    `path` and renamed into place, as save_pretrained does.
    """
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    base = Path(model.args.source_path).resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)
    try:
        _peft_config(model, lora, str(base)).save_pretrained(staging)
        save_file(adapter_state_dict(model), staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        for name in COPIED_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, staging / name)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_lora_config(folder: str | os.PathLike) -> tuple[LoraConfig, Path]:
    """Our LoraConfig of an adapter folder, and the base model folder it names."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    targets = list(config.get("target_modules") or [])
    parameters = config.get("target_parameters") or []
    targets += [name for name in _MLP_PROJECTIONS if f"{name}.weight" in parameters]  # Qwen3-Next's, see _peft_config
    if _ROUTER_PARAMETER in parameters:
        targets.append("router")
    if _EXPERT_PARAMETERS[0] in parameters:
        targets.append("experts")
    # PEFT may name a module by its full path (model.embed_tokens); ours are the last part.
    saved = {name.rpartition(".")[2] for name in config.get("modules_to_save") or []}
    lora = LoraConfig(rank=config["r"], alpha=float(config["lora_alpha"]), dropout=config.get("lora_dropout", 0.0),
                      targets=targets, modules_to_save=[name for name in LORA_MODULES_TO_SAVE if name in saved])
    return lora, Path(config["base_model_name_or_path"])


def load_adapters(model: Qwen3Model, folder: str | os.PathLike) -> None:
    """Copy the adapters of a PEFT adapter folder into `model`, which has the same adapters (add_lora)."""
    path = Path(folder) / ADAPTER_WEIGHTS
    expected = {}
    for name, parameter in named_adapter_parameters(model):
        key, _, from_peft = _peft_name(name, _prefix(model))
        expected[key] = (parameter, from_peft)
    with safe_open(path, framework="pt") as f:
        found = set(f.keys())
        if _ties_saved_embedding(model):
            found.discard(_LM_HEAD_KEY)  # the embedding's copy, which the model uses as its lm_head
        if found != set(expected):
            missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
            raise ValueError(
                f"{path} does not fit the model's adapters (lora.rank / lora.targets differ?): "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for key, (parameter, from_peft) in expected.items():
                value = from_peft(f.get_tensor(key), parameter.shape)
                if value.shape != parameter.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model's adapter "
                                     f"{tuple(parameter.shape)} (lora.rank differs?)")
                parameter.copy_(value)


def load_adapted(folder: str | os.PathLike, dtype: torch.dtype | None = None, device=None) -> Qwen3Model:
    """The base model named by an adapter folder with those adapters added."""
    lora, base = read_lora_config(folder)
    model = load_pretrained(base, dtype=dtype, device=device)
    add_lora(model, lora)
    load_adapters(model, folder)
    return model


def export_merged(folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write base + adapters of an adapter folder, merged, as a Hugging Face checkpoint in the base's dtype."""
    model = merge_lora(load_adapted(folder))
    save_pretrained(model, output)
    return Path(output)
