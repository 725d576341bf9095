"""Add LoRA adapters to a Qwen3Model, switch them off, fold them into the base weights.

PEFT adapts the plain nn.Linear projections (`peft.inject_adapter_in_model` with a `peft.LoraConfig`):
attention q / k / v / o, the dense MLP gate / up / down (in Qwen3-Next / Qwen3.5 MoE layers also those of
the shared expert), the Gated DeltaNet's input and output projections of the hybrid models, when
targeted the MoE router, and when targeted (a trained tower only, config.LORA_VISION_TARGETS) the vision
tower's attention qkv / proj and MLP linear_fc1 / linear_fc2. The grouped
MoE expert tensors are not nn.Linear modules; our ExpertLoRA (experts.py) adapts them. The modules of
lora.modules_to_save (embed_tokens, lm_head) are trained whole: PEFT's ModulesToSaveWrapper keeps the
frozen original and a trainable copy, and switching the adapters off switches back to the original.
"""

from __future__ import annotations

import re

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from gspo_engine.config import LORA_MODULES_TO_SAVE, LORA_TARGETS, LoraConfig
from gspo_engine.lora.experts import ExpertLoRA
from gspo_engine.model import Qwen3Model

# The targets that are nn.Linear modules of that name (PEFT matches them by suffix): all but the grouped experts.
LINEAR_TARGETS = tuple(name for name in LORA_TARGETS if name != "experts")
ADAPTER_NAME = "default"  # PEFT's name of a model's only adapter


def require_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs PEFT: pip install peft") from error
    return peft


def targets_module(name: str, target: str) -> bool:
    """Whether the target names the module `name`, as PEFT matches target_modules: the whole name or its last parts
    (`attn.qkv` names `visual.blocks.0.attn.qkv`)."""
    return name == target or name.endswith("." + target)


# Modules never adapted, whatever lora.targets names: Qwen3-Omni's audio encoder is always frozen (its attention
# projections share the text layers' names q_proj / k_proj / v_proj and Qwen3-Next's out_proj). A regular
# expression PEFT matches against whole module names (LoraConfig.exclude_modules).
NEVER_ADAPTED = r"(.*\.)?audio_tower(\..*)?"


def never_adapted(name: str) -> bool:
    return re.fullmatch(NEVER_ADAPTED, name) is not None


def linear_targets(model: Qwen3Model, targets: list[str]) -> list[str]:
    """The targeted nn.Linear names this model has (a dense model has no router, an all-MoE model no dense MLP,
    a text model no vision tower)."""
    # An adapted projection keeps its nn.Linear as `base_layer`.
    linear = [name.removesuffix(".base_layer") for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and not never_adapted(name)]
    return [target for target in LINEAR_TARGETS
            if target in targets and any(targets_module(name, target) for name in linear)]


def saved_module_names(model: Qwen3Model, modules_to_save: list[str]) -> list[str]:
    """The modules of `model` that lora.modules_to_save trains whole.

    A model that ties its lm_head to embed_tokens has no lm_head module: naming either trains the
    embedding, which is then both the input embedding and the output projection.
    """
    if model.lm_head is None:
        return ["embed_tokens"] if modules_to_save else []
    return [name for name in LORA_MODULES_TO_SAVE if name in modules_to_save]


def add_lora(model: Qwen3Model, lora: LoraConfig) -> None:
    """Freeze every base weight and add trainable adapters (fp32, B = 0) on the targets, in place."""
    model.requires_grad_(False)
    linear = linear_targets(model, lora.targets)
    adapt_experts = "experts" in lora.targets and model.args.is_moe
    if not linear and not adapt_experts:
        raise ValueError(f"lora.targets: {lora.targets} match no weight of this model")
    saved = saved_module_names(model, lora.modules_to_save)
    if linear or saved:
        peft = require_peft()
    if linear:
        config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout,
                                 target_modules=linear, exclude_modules=NEVER_ADAPTED, bias="none")
        peft.inject_adapter_in_model(config, model)
    if adapt_experts:
        args = model.args
        device = model.embed_tokens.weight.device
        for block in model.layers:
            if block.is_moe:
                block.mlp.expert_lora = ExpertLoRA(
                    args.num_experts, args.hidden_size, args.moe_intermediate_size, lora.rank, lora.scale_alpha
                ).to(device)
    for name in saved:
        wrapper = peft.utils.ModulesToSaveWrapper(getattr(model, name), ADAPTER_NAME)
        wrapper.set_adapter(ADAPTER_NAME)
        setattr(model, name, wrapper)
    for parameter in adapter_parameters(model):
        # PEFT gives an adapter (and a saved module's copy) its base layer's dtype; they are the
        # master weights: fp32.
        parameter.data = parameter.data.to(torch.float32)
        parameter.requires_grad_(True)


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in adapter_parameters(model))


def named_adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, parameter in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or ".expert_lora." in name or ".modules_to_save." in name:
            yield name, parameter


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (parameter for _, parameter in named_adapter_parameters(model))


def _peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every PEFT LoRA layer and saved-module wrapper; none (and PEFT not imported)
    in a model without adapters."""
    if not has_lora(model):
        return []
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper))]


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside the block (the GSPO reference policy), the adapted one again after it.

    The saved modules switch back to their frozen originals too.
    """
    peft_layers = [layer for _, layer in _peft_layers(model)]
    experts = [module for module in model.modules() if isinstance(module, ExpertLoRA)]
    for layer in peft_layers:
        layer.enable_adapters(False)
    for adapter in experts:
        adapter.enabled = False
    try:
        yield model
    finally:
        for layer in peft_layers:
            # enable_adapters(False) also froze the adapters and copies; this makes them trainable again.
            layer.enable_adapters(True)
        for adapter in experts:
            adapter.enabled = True


def merge_lora(model: Qwen3Model) -> Qwen3Model:
    """Fold every adapter into its base weight and remove it: a plain Qwen3Model again, in place.

    A saved module's trained copy replaces its original, in the original's dtype.
    """
    for name, layer in _peft_layers(model):
        from peft.utils import ModulesToSaveWrapper

        if isinstance(layer, ModulesToSaveWrapper):
            dtype = layer.original_module.weight.dtype
            replacement = layer.modules_to_save[ADAPTER_NAME].to(dtype)
        else:
            layer.merge()
            replacement = layer.get_base_layer()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, replacement)
    for block in model.layers:
        adapter = getattr(block.mlp, "expert_lora", None)
        if adapter is not None:
            adapter.merge_into(block.mlp.gate_up, block.mlp.down)
            block.mlp.expert_lora = None
    return model


def adapter_parameter_count(model: Qwen3Model, lora: LoraConfig) -> int:
    """How many parameters add_lora would add to `model`: the adapters and the saved modules' copies
    (a plain model; the meta device is fine)."""
    linear = set(linear_targets(model, lora.targets))
    count = 0
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and not never_adapted(name)
                and any(targets_module(name, target) for target in linear)):
            count += lora.rank * (module.in_features + module.out_features)
    if "experts" in lora.targets and model.args.is_moe:
        args = model.args
        per_layer = args.num_experts * lora.rank * (2 * args.hidden_size + 3 * args.moe_intermediate_size)
        count += per_layer * len(args.moe_layers)
    for name in saved_module_names(model, lora.modules_to_save):
        count += sum(p.numel() for p in getattr(model, name).parameters())
    return count
