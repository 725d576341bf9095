"""LoRA: low-rank adapters on a frozen Qwen3Model, trained by GSPO, saved in PEFT's format, merged for export.

adapters.py adds, disables and merges them (PEFT on the nn.Linear projections), experts.py is our
per-expert LoRA on the grouped MoE tensors, peft_format.py reads and writes adapter folders.
"""

from gspo_engine.lora.adapters import (
    adapter_parameter_count,
    adapter_parameters,
    adapters_disabled,
    add_lora,
    has_lora,
    merge_lora,
)
from gspo_engine.lora.experts import ExpertLoRA
from gspo_engine.lora.peft_format import (
    export_merged,
    is_adapter_folder,
    load_adapted,
    load_adapters,
    read_lora_config,
    save_adapters,
)

__all__ = [
    "ExpertLoRA", "adapter_parameter_count", "adapter_parameters", "adapters_disabled", "add_lora", "export_merged",
    "has_lora", "is_adapter_folder", "load_adapted", "load_adapters", "merge_lora", "read_lora_config",
    "save_adapters",
]
