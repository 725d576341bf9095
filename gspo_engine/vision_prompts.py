"""Prompts with images for Qwen3-VL models: reading the images, placing them in the prompt, the processor's pixels.

A dataset row names its images in the `images` column (a path or a list of paths, relative to the
dataset file; images decoded by `datasets`, or drawn in memory by the built-in vision task, work too).
They take the places the prompt marks for them: chat message parts `{"type": "image"}`, or `<image>`
in a string prompt; a prompt that marks none gets them in front of its text. Each place becomes the
model's `<|vision_start|><|image_pad|><|vision_end|>`, and the image pad is repeated once per visual
token of that image, as the model's processor does.

The pixels come from the model's own image processor (transformers' AutoImageProcessor, read from
the model folder's preprocessor_config.json): resizing, normalisation and patching are its work.
`data.vision_resolution` N caps an image at N x N pixels (aspect kept; the processor rounds the sides
to multiples of patch x merge size), `data.vision_min_resolution` M raises it to at least M x M: together
they bound the visual tokens per image.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gspo_engine.model.qwen3_vl import ImageInputs
from gspo_engine.media_places import MediaError, MediaKind, expand_pads, source_path, with_places
from gspo_engine.model.vision_args import VisionArgs

IMAGE_MARKER = "<image>"  # where a string prompt puts an image
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_PLACE = VISION_START + IMAGE_PAD + VISION_END  # one image's place in a string prompt


class ImageError(MediaError):
    """An image that cannot be used, with the dataset row that names it."""


IMAGES = MediaKind("image", "images", IMAGE_MARKER, "the images need", ImageError)


class ImageProcessing:
    """The model's image processor at the run's resolution, and the images' visual tokens."""

    def __init__(self, folder: str | Path, vision: VisionArgs, resolution: int | None = None,
                 min_resolution: int | None = None):
        from transformers import AutoImageProcessor

        folder = Path(folder)
        if not (folder / "preprocessor_config.json").is_file():
            raise ImageError(f"{folder} has no preprocessor_config.json: the model's image processor is needed for "
                             "prompts with images")
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.vision = vision
        self.size: dict[str, int] = {}
        if resolution is not None:
            self.size["longest_edge"] = resolution * resolution
        if min_resolution is not None:
            self.size["shortest_edge"] = min_resolution * min_resolution
        if self.size and "shortest_edge" not in self.size:
            # Below the processor's own minimum the cap could not hold: lower the minimum with it.
            self.size["shortest_edge"] = min(self.size["longest_edge"], _processor_size(self.processor, "shortest_edge"))
        if self.size and "longest_edge" not in self.size:
            self.size["longest_edge"] = max(self.size["shortest_edge"], _processor_size(self.processor, "longest_edge"))

    def open(self, source: Any, where: str, root: Path | None) -> Image.Image:
        """The image `source` names (a path, a PIL image, or datasets' {"bytes", "path"}) as RGB; ImageError naming it."""
        if isinstance(source, Image.Image):
            return source.convert("RGB")
        if isinstance(source, dict) and source.get("bytes") is not None:
            return _read(io.BytesIO(source["bytes"]), f"{where}: image {source.get('path') or 'bytes'}")
        path = source_path(source, IMAGES, where, root)
        if not path.is_file():
            raise ImageError(f"{where}: image file {path} does not exist")
        return _read(path, f"{where}: image file {path}")

    def inputs(self, images: list[Image.Image]) -> ImageInputs:
        """pixel_values and grid_thw of the images, from the model's image processor."""
        kwargs = {"size": self.size} if self.size else {}
        out = self.processor(images=images, return_tensors="pt", **kwargs)
        return ImageInputs(out["pixel_values"], out["image_grid_thw"].to(torch.long))

    def token_counts(self, inputs: ImageInputs) -> list[int]:
        merge = self.vision.spatial_merge_size
        return [int(t * h * w) // merge**2 for t, h, w in inputs.grid_thw.tolist()]


def image_sources(value: Any, where: str) -> list[Any]:
    """The `images` column of a row as a list (one path or image, or a list of them)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, dict, Image.Image)):
        return [value]
    raise ImageError(f"{where}: images must be a path or a list of paths, got {type(value).__name__}")


def with_image_places(prompt: str | list[dict], count: int, where: str) -> str | list[dict]:
    """The prompt with `count` image places: those it marks, or as many put in front of its text."""
    return with_places(prompt, count, IMAGE_PLACE, IMAGES, where)


def expand_image_pads(token_ids: list[int], counts: list[int], vision: VisionArgs, where: str) -> list[int]:
    """token_ids with the i-th image pad repeated counts[i] times (the processor's expansion)."""
    return expand_pads(token_ids, counts, vision.image_token_id, IMAGES, where)


def _read(file, what: str) -> Image.Image:
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for a damaged or non-image file
        raise ImageError(f"{what} cannot be read as an image: {error}") from error


def _processor_size(processor, key: str) -> int:
    size = getattr(processor, "size", None) or {}
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    if value is None:
        value = getattr(processor, "min_pixels" if key == "shortest_edge" else "max_pixels")
    return int(value)
