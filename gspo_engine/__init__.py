"""gspo-engine: GSPO fine-tuning of Qwen3 dense and MoE models."""

__version__ = "0.1.0"
