"""gspo-engine: GSPO fine-tuning of Qwen3 dense and MoE models."""

__version__ = "0.1.0"

from gspo_engine.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from gspo_engine.rollout import Generation, generate, replay_experts  # noqa: E402

__all__ = ["__version__", "Generation", "generate", "load_pretrained", "replay_experts", "save_pretrained"]
