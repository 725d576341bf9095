"""Qwen3 dense and Qwen3-MoE as plain PyTorch modules; see gspo_engine/hf_checkpoint.py for loading Hugging Face weights."""

from gspo_engine.model.args import ModelArgs, RopeScaling
from gspo_engine.model.moe import Routing
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.qwen3 import ModelOutput, Qwen3Model

__all__ = ["ModelArgs", "ModelOutput", "PackedSequences", "Qwen3Model", "RopeScaling", "Routing"]
