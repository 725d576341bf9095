"""Qwen3 dense, Qwen3-MoE and the hybrid Qwen3-Next / Qwen3.5 text models as plain PyTorch modules; see
gspo_engine/hf_checkpoint.py for loading Hugging Face weights."""

from gspo_engine.model.args import ModelArgs, RopeScaling
from gspo_engine.model.moe import Routing
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.qwen3 import ModelOutput, Qwen3Model
from gspo_engine.model.qwen3_next import Qwen3NextModel, build_model

__all__ = ["ModelArgs", "ModelOutput", "PackedSequences", "Qwen3Model", "Qwen3NextModel", "RopeScaling", "Routing", "build_model"]
