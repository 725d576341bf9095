"""Qwen3 dense, Qwen3-MoE, the hybrid Qwen3-Next / Qwen3.5 text models, Qwen3-VL and the Qwen3-Omni thinker as plain
PyTorch modules; see gspo_engine/hf_checkpoint.py for loading Hugging Face weights."""

from gspo_engine.model.args import ModelArgs, RopeScaling
from gspo_engine.model.audio import AudioInputs
from gspo_engine.model.hybrid_cache import HybridCache  # registers itself with KVCache.allocate and slot_bytes
from gspo_engine.model.moe import Routing
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.qwen3 import ModelOutput, Qwen3Model
from gspo_engine.model.qwen3_next import Qwen3NextModel
from gspo_engine.model.qwen3_omni import Qwen3OmniThinker
from gspo_engine.model.qwen3_vl import ImageInputs, Qwen3VLModel
from gspo_engine.model.qwen3_vl_hybrid import Qwen3_5VLModel, build_model
from gspo_engine.model.vision import VisionFeatures

__all__ = [
    "AudioInputs", "HybridCache", "ImageInputs", "ModelArgs", "ModelOutput", "PackedSequences", "Qwen3Model", "Qwen3NextModel", "Qwen3VLModel",
    "Qwen3OmniThinker", "Qwen3_5VLModel",
    "RopeScaling", "Routing", "VisionFeatures", "build_model",
]
