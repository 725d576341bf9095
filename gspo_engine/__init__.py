"""gspo-engine: GSPO fine-tuning of Qwen3 dense and MoE models."""

import importlib

__version__ = "0.1.0"

# Public names and the module that defines each. They are imported on first use, so that
# `gspo-engine --help` and `--version` answer without loading torch.
_EXPORTS = {
    "load_pretrained": "gspo_engine.hf_checkpoint",
    "save_pretrained": "gspo_engine.hf_checkpoint",
    "Generation": "gspo_engine.rollout",
    "generate": "gspo_engine.rollout",
    "replay_experts": "gspo_engine.routing_replay",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gspo_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
