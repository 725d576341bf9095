"""The vision tower's share of a step (Qwen3-VL, Qwen3.5 with images): its parameters, the visual tokens an image
brings at data.vision_resolution, the images and features each prompt keeps through the step, and what the tower
keeps for its backward when it trains (gspo_engine/model/vision.py, tensor by tensor; docs/planner.md).

The processor resizes an image to at most N x N pixels with sides that are multiples of patch x merge size
(32 for the released models), so an image brings at most N^2 / 32^2 visual tokens; a square N x N image with
N a multiple of 32 brings exactly that many. The image pads count in data.max_prompt_tokens (the dataset skips
longer prompts, gspo_engine/data.py), so they take no room beyond the prompt the planner already holds; a
prompt's images bring at most as many visual tokens as fit in it, each image with its vision start and end.
"""

from __future__ import annotations

from dataclasses import dataclass

from gspo_engine.config import LORA_VISION_TARGETS, Config
from gspo_engine.model.vision_args import VisionArgs
from gspo_engine.planner.activations import Compute

MARKERS_PER_IMAGE = 2  # <|vision_start|> and <|vision_end|> around each image's pads


def visual_tokens_per_image(vision: VisionArgs, resolution: int) -> int:
    """The most visual tokens an image of at most resolution x resolution pixels brings."""
    side = vision.patch_size * vision.spatial_merge_size
    return resolution * resolution // (side * side)


def visual_tokens_per_prompt(per_image: int | None, prompt_tokens: int) -> tuple[int, int]:
    """(visual tokens, images) of the prompt of at most prompt_tokens tokens that holds the most visual tokens.

    n images hold at most min(n x per_image, prompt_tokens - 2n) of them: the most is at the n where the two
    cross, or just below it. Without a cap one image fills the prompt.
    """
    room = prompt_tokens - MARKERS_PER_IMAGE
    if per_image is None or per_image >= room:
        return max(0, room), 1
    full = prompt_tokens // (per_image + MARKERS_PER_IMAGE)  # images at the cap that fit whole
    one_more = min((full + 1) * per_image, prompt_tokens - MARKERS_PER_IMAGE * (full + 1))
    return (full * per_image, full) if full * per_image >= one_more else (one_more, full + 1)


def image_bytes_per_token(vision: VisionArgs, compute: Compute) -> int:
    """What a prompt's PromptVision keeps per visual token until the step ends: the processor's fp32 pixel values of
    its merge block's patches, and the features of the merger and each DeepStack merger (in the compute dtype)."""
    patches = vision.spatial_merge_size**2
    features = 1 + len(vision.deepstack_visual_indexes)
    return patches * vision.patch_dim * 4 + features * vision.out_hidden_size * compute.compute


def vision_block_bytes(vision: VisionArgs, compute: Compute) -> int:
    """Bytes per patch one vision block keeps for its backward (VisionBlock).

    The tower's stream is in the compute dtype (the patch embedding's output under autocast). Two
    LayerNorms keep their input and fp32 mean and rstd; attention keeps the first norm's output (qkv's
    input), qkv's output (v is a view of it), q and k after the rotation, its output and log-sum-exp, and
    proj's input; the MLP the second norm's output, linear_fc1's output and the GELU's.
    """
    width, c = vision.hidden_size, compute.compute
    return 2 * (c * width + 8) + 9 * c * width + 4 * vision.num_heads + 2 * c * vision.intermediate_size


def tower_patch_bytes(vision: VisionArgs, compute: Compute, checkpointing: bool) -> float:
    """Bytes per patch the whole tower keeps for its backward: its blocks (or their inputs alone under activation
    checkpointing), the pixels as the patch embedding reads them, the position embedding's taps and weights, the
    rotary cos / sin, the merger and each DeepStack merger (norm, the merged rows as linear_fc1 reads them, its
    output and the GELU's)."""
    width, c, merged = vision.hidden_size, compute.compute, vision.spatial_merge_size**2
    blocks = vision.depth * (c * width if checkpointing else vision_block_bytes(vision, compute))
    pixels = c * vision.patch_dim if c != 4 else 0  # fp32 pixels are read as they are (counted with the inputs)
    position = 4 * 8 + 4 * compute.weights  # four int64 taps and their weights in the table's dtype
    rotary = 2 * 4 * vision.head_dim
    merger = c * width + 8 + 3 * c * width
    deepstack = len(vision.deepstack_visual_indexes) * (8 / merged + 3 * c * width)
    return blocks + pixels + position + rotary + merger + deepstack


@dataclass(frozen=True)
class VisionPlan:
    """What the tower adds to a step, per GPU."""

    parameters: int
    trained: bool  # tower_runs_with_grad: it keeps activations (and without LoRA has gradients, AdamW states)
    resolution: int | None  # data.vision_resolution
    merged_patch_pixels: int  # the side of a visual token's pixels: patch size x merge size
    tokens_per_image: int | None  # at most; None: no cap (data.vision_resolution unset)
    tokens_per_prompt: int  # the most a prompt of data.max_prompt_tokens holds
    images_per_prompt: int  # in that prompt
    patches_per_prompt: int  # tokens_per_prompt x the merge block's patches
    prompt_bytes: float  # one such prompt's pixel values and image features, kept for the whole step
    patch_bytes: float  # what the trained tower keeps per patch of a micro-batch's images

    def held_bytes(self, prompts: int) -> float:
        """The images and features of `prompts` prompts (a GPU's share of the step)."""
        return prompts * self.prompt_bytes

    def activation_bytes(self, prompts: int) -> float:
        """What the trained tower keeps for the images of `prompts` prompts in a micro-batch (0 when frozen)."""
        return prompts * self.patches_per_prompt * self.patch_bytes if self.trained else 0.0


def vision_plan(config: Config, vision: VisionArgs, parameters: int, compute: Compute) -> VisionPlan:
    resolution = config.data.vision_resolution
    per_image = None if resolution is None else visual_tokens_per_image(vision, resolution)
    tokens, images = visual_tokens_per_prompt(per_image, config.data.max_prompt_tokens)
    merged = vision.spatial_merge_size**2
    side = vision.patch_size * vision.spatial_merge_size
    return VisionPlan(parameters, tower_runs_with_grad(config), resolution, side, per_image, tokens, images,
                      tokens * merged, tokens * image_bytes_per_token(vision, compute),
                      tower_patch_bytes(vision, compute, config.model.activation_checkpointing))


def tower_runs_with_grad(config: Config) -> bool:
    """The tower trains: whole (model.freeze_vision_tower false), or under LoRA through adapters on its modules."""
    if config.model.freeze_vision_tower:
        return False
    return not config.lora.rank or any(target in LORA_VISION_TARGETS for target in config.lora.targets)


def prompts_in_micro_batch(sequences: int, group_size: int, prompts: int) -> int:
    """The most prompts `sequences` consecutive samples (a micro-batch; a prompt's group lies together) span."""
    return min(prompts, (sequences - 2) // group_size + 2)
