"""Arguments of the Qwen3-Omni audio encoder, read from the thinker config's audio_config and its audio token ids.

Imports nothing of the package, so that args.py (the text model's arguments) can hold an AudioArgs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What transformers' Qwen3OmniMoeAudioEncoderConfig / Qwen3OmniMoeThinkerConfig take when config.json leaves a key out.
_AUDIO_DEFAULTS = dict(
    num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280,
    activation_function="gelu", max_source_positions=1500, n_window=50, output_dim=3584, n_window_infer=800,
    conv_chunksize=500, downsample_hidden_size=480,
)
_TOKEN_DEFAULTS = dict(audio_token_id=151646, audio_start_token_id=151647, audio_end_token_id=151648)
AUDIO_ACTIVATIONS = ("gelu",)


@dataclass
class AudioArgs:
    """The audio encoder's shape (audio_config) and the audio tokens of the thinker config."""

    num_mel_bins: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    d_model: int
    output_dim: int  # the language model's width
    max_source_positions: int  # rows of the sinusoidal position table (frames of one chunk after the convolutions)
    n_window: int  # a chunk holds 2 * n_window mel frames
    n_window_infer: int  # attention windows span n_window_infer mel frames' worth of encoder frames
    downsample_hidden_size: int
    conv_chunksize: int = 500  # chunks per convolution call in transformers; the result does not depend on it
    activation_function: str = "gelu"
    audio_token_id: int = _TOKEN_DEFAULTS["audio_token_id"]
    audio_start_token_id: int = _TOKEN_DEFAULTS["audio_start_token_id"]
    audio_end_token_id: int = _TOKEN_DEFAULTS["audio_end_token_id"]
    # The thinker's positions per second of video (model/omni_positions.py), a thinker key like the audio tokens.
    position_id_per_seconds: float = 25.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Tokens only the processor places (audio pads, audio start / end): never sampled."""
        return (self.audio_token_id, self.audio_start_token_id, self.audio_end_token_id)

    @classmethod
    def from_hf_config(cls, thinker: dict[str, Any]) -> "AudioArgs":
        """From a Qwen3-Omni thinker_config dict (its audio_config and its token ids)."""
        audio = thinker.get("audio_config")
        if not isinstance(audio, dict):
            raise ValueError("a Qwen3-Omni thinker_config needs an audio_config")
        values = {key: audio.get(key, default) for key, default in _AUDIO_DEFAULTS.items()}
        if values["activation_function"] not in AUDIO_ACTIVATIONS:
            raise ValueError(
                f"unsupported audio_config.activation_function {values['activation_function']!r}; "
                f"supported: {', '.join(AUDIO_ACTIVATIONS)}"
            )
        if values["d_model"] % values["encoder_attention_heads"]:
            raise ValueError(
                f"audio_config.d_model ({values['d_model']}) is not a multiple of "
                f"encoder_attention_heads ({values['encoder_attention_heads']})"
            )
        if values["n_window_infer"] % (2 * values["n_window"]):
            raise ValueError(
                f"audio_config.n_window_infer ({values['n_window_infer']}) is not a multiple of 2 * n_window "
                f"({2 * values['n_window']})"
            )
        tokens = {key: thinker.get(key, default) for key, default in _TOKEN_DEFAULTS.items()}
        return cls(**values, **tokens, position_id_per_seconds=float(thinker.get("position_id_per_seconds", 25)))
