"""The embedded tiny-omni model: a small random Qwen3-Omni thinker with the task tokenizer, vision and audio tokens,
an image processor and a feature extractor.

Written as an ordinary Hugging Face folder (config.json with thinker_config holding text_config, vision_config
and audio_config; model.safetensors; tokenizer files; preprocessor_config.json for transformers' Qwen2-VL image
processor and Whisper feature extractor, in one file as the released models have them), then loaded like a
released Qwen3-Omni checkpoint, so the built-in audio task (audio_task.py) trains through the code a real model
uses. It has no talker (enable_audio_output false): transformers loads it as the thinker alone.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from gspo_engine.builtin_tasks import SEPARATOR
from gspo_engine.config import AUDIO_TASKS, BUILTIN_TASKS, VISION_TASKS
from gspo_engine.hf_checkpoint import save_pretrained
from gspo_engine.model import ModelArgs, build_model
from gspo_engine.model.args import OMNI_ARCHITECTURE
from gspo_engine.model.audio_args import AudioArgs
from gspo_engine.model.vision_args import VisionArgs
from gspo_engine.tiny_vl import PATCH_SIZE, VIDEO_PAD, VISION_TOKENS
from gspo_engine.vision_prompts import IMAGE_PAD, VISION_END, VISION_START

EOS, UNK = "<eos>", "<unk>"
AUDIO_START, AUDIO_PAD, AUDIO_END = "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
AUDIO_TOKENS = (AUDIO_START, AUDIO_PAD, AUDIO_END)
INIT_STD = 0.02
MEL_BINS = 32
VISION_CONFIG = dict(
    depth=2, hidden_size=32, num_heads=2, intermediate_size=64, hidden_act="gelu_pytorch_tanh", in_channels=3,
    patch_size=PATCH_SIZE, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
    num_position_embeddings=16, deepstack_visual_indexes=[0],
)
# n_window 50 as released (chunks of one second); two windows of chunks per attention window.
AUDIO_CONFIG = dict(
    num_mel_bins=MEL_BINS, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
    output_dim=64, max_source_positions=100, n_window=50, n_window_infer=200, downsample_hidden_size=16,
    activation_function="gelu",
)
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=256, rope_theta=10000.0, dtype=torch.float32, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, router_aux_loss_coef=0.001,
    rope_extra={"mrope_section": [2, 3, 3], "mrope_interleaved": True},
)


def tiny_omni_vocabulary() -> list[str]:
    tags = [f"<{task}>" for task in (*BUILTIN_TASKS, *VISION_TASKS, *AUDIO_TASKS)]
    return [EOS, UNK, *"0123456789", SEPARATOR, *tags, *VISION_TOKENS, *AUDIO_TOKENS]


def save_tiny_omni_processor(folder: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and preprocessor_config.json of tiny-omni in `folder`."""
    from transformers import Qwen2VLImageProcessorPil, WhisperFeatureExtractor

    vocabulary = {token: index for index, token in enumerate(tiny_omni_vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|[a-z_]+\|>|<[a-z]+>|[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    special = (EOS, *VISION_TOKENS, *AUDIO_TOKENS)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    Qwen2VLImageProcessorPil(patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=2).save_pretrained(folder)
    image = json.loads((folder / "preprocessor_config.json").read_text())
    audio = WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=16000).to_dict()
    merged = {**image, **audio}
    (folder / "preprocessor_config.json").write_text(json.dumps(merged, indent=2, default=_json_value) + "\n")


def _json_value(value):
    return value.tolist()  # the extractor's mel filter bank is a numpy array


def tiny_omni_args() -> ModelArgs:
    vocabulary = tiny_omni_vocabulary()
    tokens = dict(
        image_token_id=vocabulary.index(IMAGE_PAD), video_token_id=vocabulary.index(VIDEO_PAD),
        vision_start_token_id=vocabulary.index(VISION_START), vision_end_token_id=vocabulary.index(VISION_END),
        audio_token_id=vocabulary.index(AUDIO_PAD), audio_start_token_id=vocabulary.index(AUDIO_START),
        audio_end_token_id=vocabulary.index(AUDIO_END),
    )
    thinker = {"model_type": "qwen3_omni_moe_thinker", "vision_config": dict(VISION_CONFIG),
               "audio_config": dict(AUDIO_CONFIG), "position_id_per_seconds": 25, **tokens}
    multimodal = {"architectures": [OMNI_ARCHITECTURE], "model_type": "qwen3_omni_moe", "enable_audio_output": False,
                  "thinker_config": thinker}
    return ModelArgs(vocab_size=len(vocabulary), **TEXT, multimodal_config=multimodal,
                     vision=VisionArgs.from_hf_config(thinker), audio=AudioArgs.from_hf_config(thinker))


def build_tiny_omni_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write tiny-omni with random weights: matrices N(0, INIT_STD), the audio encoder's N(0, 1 / fan_in) (at
    INIT_STD its convolutions' output would vanish under the sinusoidal positions, and every audio would look
    alike), norm weights 1, biases 0."""
    args = tiny_omni_args()
    model = build_model(args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                std = fan_in**-0.5 if name.startswith("audio_tower.") else INIT_STD
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            else:
                parameter.fill_(0.0 if name.endswith("bias") else 1.0)
    with tempfile.TemporaryDirectory() as processor_folder:
        save_tiny_omni_processor(Path(processor_folder), args.max_position_embeddings)
        model.args.source_path = processor_folder  # save_pretrained copies the tokenizer and processor files
        save_pretrained(model, folder)
    return Path(folder)
