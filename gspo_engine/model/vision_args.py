"""Arguments of the Qwen3-VL vision tower, read from config.json's vision_config and the outer config's token ids.

Imports nothing of the package, so that args.py (the text model's arguments) can hold a VisionArgs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# What transformers' Qwen3VLVisionConfig / Qwen3VLConfig take when config.json leaves a key out.
_VISION_DEFAULTS = dict(
    depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304, num_heads=16, in_channels=3,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
)
_TOKEN_DEFAULTS = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
)
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
DEFAULT_MROPE_SECTION = [24, 20, 20]  # transformers' default when rope_parameters names none


@dataclass
class VisionArgs:
    """The vision tower's shape (config.json's vision_config) and the special tokens of the outer config."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the language model's width, which the mergers project into
    num_position_embeddings: int  # a square grid of learned positions, interpolated to each image
    deepstack_visual_indexes: list[int] = field(default_factory=list)
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    image_token_id: int = _TOKEN_DEFAULTS["image_token_id"]
    video_token_id: int = _TOKEN_DEFAULTS["video_token_id"]
    vision_start_token_id: int = _TOKEN_DEFAULTS["vision_start_token_id"]
    vision_end_token_id: int = _TOKEN_DEFAULTS["vision_end_token_id"]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch in pixel_values: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Tokens that only the processor places (image / video pads, vision start / end): never sampled."""
        return (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "VisionArgs":
        """From the whole image-text config.json dict (its vision_config and its token ids)."""
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ValueError("an image-text config.json needs a vision_config")
        values = {key: vision.get(key, default) for key, default in _VISION_DEFAULTS.items()}
        architectures = config.get("architectures") or [config.get("model_type") or ""]
        if "deepstack_visual_indexes" not in vision and architectures[0].lower().startswith("qwen3_5"):
            values["deepstack_visual_indexes"] = []  # Qwen3.5's tower has no DeepStack mergers
        if values["hidden_act"] not in VISION_ACTIVATIONS:
            raise ValueError(
                f"unsupported vision_config.hidden_act {values['hidden_act']!r}; supported: {', '.join(VISION_ACTIVATIONS)}"
            )
        for key in ("patch_size", "temporal_patch_size"):
            if not isinstance(values[key], int):
                raise ValueError(f"vision_config.{key} must be one integer, got {values[key]!r}")
        if values["hidden_size"] % values["num_heads"]:
            raise ValueError(
                f"vision_config.hidden_size ({values['hidden_size']}) is not a multiple of num_heads ({values['num_heads']})"
            )
        side = int(values["num_position_embeddings"] ** 0.5)
        if side * side != values["num_position_embeddings"]:
            raise ValueError(f"vision_config.num_position_embeddings ({values['num_position_embeddings']}) is not a square")
        bad = [i for i in values["deepstack_visual_indexes"] if not 0 <= i < values["depth"]]
        if bad:
            raise ValueError(f"vision_config.deepstack_visual_indexes {bad} are not blocks of a depth-{values['depth']} tower")
        rope = vision.get("rope_parameters") or {}
        tokens = {key: config.get(key, default) for key, default in _TOKEN_DEFAULTS.items()}
        values["deepstack_visual_indexes"] = list(values["deepstack_visual_indexes"])
        return cls(**values, rope_theta=float(rope.get("rope_theta", 10000.0)), **tokens)
