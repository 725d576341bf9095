"""The embedded tiny-vl model: a small random Qwen3-VL with the task tokenizer, vision tokens and an image processor.

Written as an ordinary Hugging Face folder (config.json with text_config and vision_config,
model.safetensors, tokenizer files, preprocessor_config.json for transformers' Qwen2-VL image
processor), then loaded like a released Qwen3-VL checkpoint, so the built-in vision task
(vision_task.py) trains through the code a real model uses.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from gspo_engine.builtin_tasks import SEPARATOR
from gspo_engine.config import BUILTIN_TASKS, VISION_TASKS
from gspo_engine.hf_checkpoint import save_pretrained
from gspo_engine.model import ModelArgs, build_model
from gspo_engine.model.vision_args import VisionArgs
from gspo_engine.vision_prompts import IMAGE_PAD, VISION_END, VISION_START

EOS, UNK, VIDEO_PAD = "<eos>", "<unk>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
INIT_STD = 0.02
PATCH_SIZE = 8
# The vision tower at tiny size: 8-pixel patches, a 4 x 4 grid of learned positions, one DeepStack merger.
VISION_CONFIG = dict(
    depth=2, hidden_size=32, num_heads=2, intermediate_size=64, hidden_act="gelu_pytorch_tanh", in_channels=3,
    patch_size=PATCH_SIZE, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
    num_position_embeddings=16, deepstack_visual_indexes=[0], model_type="qwen3_vl_vision",
)
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=256, rope_theta=10000.0, dtype=torch.float32,
    rope_extra={"mrope_section": [2, 3, 3], "mrope_interleaved": True},
)


def tiny_vl_vocabulary() -> list[str]:
    tags = [f"<{task}>" for task in (*BUILTIN_TASKS, *VISION_TASKS)]
    return [EOS, UNK, *"0123456789", SEPARATOR, *tags, *VISION_TOKENS]


def save_tiny_vl_processor(folder: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and preprocessor_config.json of tiny-vl in `folder`."""
    from transformers import Qwen2VLImageProcessorPil

    vocabulary = {token: index for index, token in enumerate(tiny_vl_vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|[a-z_]+\|>|<[a-z]+>|[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    # As in the tiny tokenizer, <eos> ends and pads; the vision tokens are special, so decoding drops them.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS, *VISION_TOKENS)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    Qwen2VLImageProcessorPil(patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=2).save_pretrained(folder)


def tiny_vl_args() -> ModelArgs:
    vocabulary = tiny_vl_vocabulary()
    tokens = dict(image_token_id=vocabulary.index(IMAGE_PAD), video_token_id=vocabulary.index(VIDEO_PAD),
                  vision_start_token_id=vocabulary.index(VISION_START), vision_end_token_id=vocabulary.index(VISION_END))
    multimodal = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                  "vision_config": dict(VISION_CONFIG), **tokens}
    return ModelArgs(vocab_size=len(vocabulary), **TEXT, multimodal_config=multimodal,
                     vision=VisionArgs.from_hf_config(multimodal))


def build_tiny_vl_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write tiny-vl with random weights: matrices N(0, INIT_STD), norm weights 1, biases 0."""
    args = tiny_vl_args()
    model = build_model(args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * INIT_STD)
            else:
                parameter.fill_(0.0 if name.endswith("bias") else 1.0)
    with tempfile.TemporaryDirectory() as processor_folder:
        save_tiny_vl_processor(Path(processor_folder), args.max_position_embeddings)
        model.args.source_path = processor_folder  # save_pretrained copies the tokenizer and processor files
        save_pretrained(model, folder)
    return Path(folder)
