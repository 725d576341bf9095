"""A tiny random Qwen3-Omni (thinker, talker, code2wav) made by transformers, and prompts with images and audio run
through transformers' image processor and Whisper feature extractor."""

from __future__ import annotations

import numpy as np
import torch
from tiny_vl_checkpoints import image_processor, random_image
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor

VOCAB = 80
AUDIO_PAD, IMAGE, VIDEO, VISION_START, VISION_END, AUDIO_START, AUDIO_END = 70, 71, 72, 73, 74, 75, 76
SPECIAL = [AUDIO_PAD, IMAGE, VIDEO, VISION_START, VISION_END, AUDIO_START, AUDIO_END]
MERGE = 2
MEL_BINS = 16
SAMPLING_RATE = 16000
TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, moe_intermediate_size=24, num_experts=4,
    num_experts_per_tok=2, initializer_range=0.1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                     "mrope_interleaved": True},
)
VISION = dict(
    depth=2, hidden_size=24, num_heads=2, intermediate_size=40, patch_size=4, temporal_patch_size=2,
    spatial_merge_size=MERGE, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0],
    initializer_range=0.1,
)
# n_window 50 as released: the processor counts audio tokens for chunks of 100 frames whatever the config says.
AUDIO = dict(
    num_mel_bins=MEL_BINS, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, output_dim=32,
    max_source_positions=100, n_window=50, n_window_infer=200, downsample_hidden_size=8, initializer_range=0.1,
)
TOKENS = dict(
    audio_token_id=AUDIO_PAD, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END, audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END,
)
TALKER = dict(
    text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8, moe_intermediate_size=8, shared_expert_intermediate_size=8,
                     num_experts=2, num_experts_per_tok=1),
    code_predictor_config=dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_code_groups=4),
    thinker_hidden_size=32, num_code_groups=4, spatial_merge_size=MERGE,
    **{key: TOKENS[key] for key in ("audio_token_id", "image_token_id", "video_token_id", "vision_start_token_id")},
)
CODE2WAV = dict(
    codebook_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=24, decoder_dim=16, num_quantizers=4, upsample_rates=[2, 2], upsampling_ratios=[2, 2],
    sliding_window=8,
)


def build_hf_omni_model(seed: int = 0) -> torch.nn.Module:
    """A random fp32 Qwen3OmniMoeForConditionalGeneration in eval mode; norms randomised too, so every weight
    matters."""
    torch.manual_seed(seed)
    thinker = dict(text_config=TEXT, vision_config=VISION, audio_config=AUDIO, **TOKENS)
    config = Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=TALKER, code2wav_config=CODE2WAV)
    model = Qwen3OmniMoeForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.talker.named_parameters():
            if ".experts." in name:  # transformers leaves the talker's grouped experts uninitialised
                param.normal_(0.0, 0.02)
        for name, param in model.thinker.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight", "ln_post.weight")):
                param.uniform_(0.5, 1.5)
            elif ("norm" in name or "ln_" in name) and name.endswith("bias"):
                param.uniform_(-0.2, 0.2)
    return model.eval()


def feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE)


def tone(seconds: float, hertz: float, seed: int) -> np.ndarray:
    """A sine with a little noise, float32 at SAMPLING_RATE."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    return (0.5 * np.sin(2 * np.pi * hertz * t) + noise).astype(np.float32)


def audio_token_counts(frames: torch.Tensor) -> list[int]:
    """transformers' count of audio tokens for audios of `frames` mel frames (chunks of 100 frames give 13)."""
    tail = frames % 100
    return (((((tail - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1) + (frames // 100) * 13).tolist()


def omni_prompt(image_sizes: list[tuple[int, int]], audio_seconds: list[float], seed: int = 0, text: int = 4):
    """input_ids [T] and the processors' outputs: random text, then each audio (start / pads / end), then each image.

    Returns input_ids, extracted audio (dict with input_features, feature_attention_mask or None) and images
    (dict with pixel_values, image_grid_thw or None).
    """
    generator = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(0, AUDIO_PAD, (text,), generator=generator)]
    audio = None
    if audio_seconds:
        waves = [tone(s, 300 + 200 * i, seed + i) for i, s in enumerate(audio_seconds)]
        audio = feature_extractor()(waves, sampling_rate=SAMPLING_RATE, padding=True, truncation=False,
                                    return_attention_mask=True, return_tensors="pt")
        for count in audio_token_counts(audio["attention_mask"].sum(-1)):
            pieces.append(torch.tensor([AUDIO_START] + [AUDIO_PAD] * count + [AUDIO_END]))
            pieces.append(torch.randint(0, AUDIO_PAD, (text,), generator=generator))
    images = None
    if image_sizes:
        images = image_processor()(images=[random_image(h, w, seed + 10 + i) for i, (h, w) in enumerate(image_sizes)],
                                   return_tensors="pt")
        for t, h, w in images["image_grid_thw"].tolist():
            pieces.append(torch.tensor([VISION_START] + [IMAGE] * (t * h * w // MERGE**2) + [VISION_END]))
            pieces.append(torch.randint(0, AUDIO_PAD, (text,), generator=generator))
    return torch.cat(pieces), audio, images


def hf_inputs(audio, images) -> dict:
    """The thinker's keyword arguments for the processors' outputs."""
    kwargs = {}
    if audio is not None:
        kwargs.update(input_features=audio["input_features"], feature_attention_mask=audio["attention_mask"])
    if images is not None:
        kwargs.update(pixel_values=images["pixel_values"], image_grid_thw=images["image_grid_thw"])
    return kwargs
