"""The Qwen3-Omni thinker: Qwen3-VL's vision tower (vision.py), the audio encoder (audio.py) and Qwen3-MoE text
layers under multimodal RoPE.

A forward embeds the tokens, puts the tower's image (and video) features in place of the image (and video)
tokens and the audio encoder's features in place of the audio tokens (each in prompt order), and runs the
text layers as Qwen3VLModel does, DeepStack included (at the image and video tokens).

Positions (omni_positions.py): an image's or a video's tokens get (start + time, start + row, start +
column), time counting position_id_per_seconds per second of video; an audio's tokens get consecutive
positions like text (one per encoder frame, 12.5 per second of audio). Videos go through a plain forward
(`videos`); prompts stored for training (PromptVision) hold images and audio.

Checkpoint keys (hf_checkpoint.py): `thinker.model.*` (text layers), `thinker.lm_head.weight`,
`thinker.visual.*` with the mergers renamed (`omni_tower_key`), `thinker.audio_tower.*`; the talker and
code2wav tensors are carried through saves unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from gspo_engine.model.args import ModelArgs
from gspo_engine.model.audio import AudioEncoder, AudioInputs
from gspo_engine.model.kv_cache import KVCache
from gspo_engine.model.omni_positions import omni_position_ids
from gspo_engine.model.packed import PackedSequences
from gspo_engine.model.qwen3 import ModelOutput, check_forced_experts, final_output, layer_attention_mask, run_layers
from gspo_engine.model.qwen3_vl import ImageInputs, PromptVision, Qwen3VLModel, _image_runs, deepstack_after
from gspo_engine.model.vision import VisionFeatures

# Our merger module names -> the thinker checkpoint's (its mergers are `ln_q` + `mlp.0` / `mlp.2`).
_MERGER_PARTS = {"norm": "ln_q", "linear_fc1": "mlp.0", "linear_fc2": "mlp.2"}
_MERGER = re.compile(r"visual\.(merger|deepstack_merger_list\.(\d+))\.(norm|linear_fc1|linear_fc2)\.(weight|bias)")


def omni_tower_key(name: str) -> str:
    """The thinker checkpoint's key of our tower tensor `name` (`visual.*` or `audio_tower.*`)."""
    match = _MERGER.fullmatch(name)
    if match is None:
        return f"thinker.{name}"
    _, index, part, leaf = match.groups()
    where = "merger" if index is None else f"merger_list.{index}"
    return f"thinker.visual.{where}.{_MERGER_PARTS[part]}.{leaf}"


@dataclass
class VideoInputs:
    """The video processor's output: pixel_values [N, patch_dim], grid_thw [V, 3] (int64), and each video's seconds
    per temporal patch (the processor's video_second_per_grid)."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    seconds_per_grid: list[float]


def joint_deepstack(image_mask: torch.Tensor | None, image_deepstack: list[torch.Tensor], video_mask: torch.Tensor,
                    video_deepstack: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The visual tokens' mask [B, T] (images and videos) and each DeepStack merger's features for them, in order."""
    if image_mask is None:
        return video_mask, video_deepstack
    visual = image_mask | video_mask
    is_video = video_mask[visual]
    joint = []
    for image, video in zip(image_deepstack, video_deepstack):
        features = video.new_zeros(is_video.shape[0], video.shape[-1])
        features[~is_video] = image.to(video.dtype)
        features[is_video] = video
        joint.append(features)
    return visual, joint


def place_audio(x: torch.Tensor, input_ids: torch.Tensor, audio_token_id: int, features: torch.Tensor) -> torch.Tensor:
    """x [B, T, H] with the audio features [M, H] in place of the M audio tokens of input_ids [B, T], in order."""
    mask = input_ids == audio_token_id
    count = int(mask.sum())
    if count != features.shape[0]:
        raise ValueError(f"the rows hold {count} audio tokens and the audios give {features.shape[0]} features")
    return x.masked_scatter(mask[..., None], features.to(x.dtype))


class Qwen3OmniThinker(Qwen3VLModel):
    """Qwen3VLModel's interface with audio: `audios` (run through the encoder), `audio_features` (its output) or
    the audio a PromptVision of `visions` holds."""

    def __init__(self, args: ModelArgs):
        if args.audio is None:
            raise ValueError("Qwen3OmniThinker needs audio arguments (args.audio)")
        super().__init__(args)
        self.audio_tower = AudioEncoder(args.audio)

    def encode_audio(self, audios: AudioInputs) -> torch.Tensor:
        """[M, H]: one feature per audio token, the audios one after the other."""
        return self.audio_tower(audios.features, audios.lengths)

    def no_image_features(self) -> VisionFeatures:
        """The tower's output for no images (a prompt with audio only)."""
        weight = self.embed_tokens.weight
        empty = torch.zeros(0, self.args.hidden_size, dtype=weight.dtype, device=weight.device)
        return VisionFeatures(empty, [empty] * len(self.args.vision.deepstack_visual_indexes), [])

    def prompt_vision(
        self, input_ids: torch.Tensor, images: ImageInputs | None = None, features: VisionFeatures | None = None,
        audios: AudioInputs | None = None,
    ) -> PromptVision:
        """PromptVision of one prompt input_ids [L] with its images and its audios (either may be None)."""
        device = self.embed_tokens.weight.device
        grid = None if images is None else images.grid_thw.cpu()
        position_ids, delta = self.sequence_positions(input_ids.cpu(), grid)
        with torch.no_grad():
            if features is None:
                features = self.no_image_features() if images is None else self.encode_images(images.to(device))
            audio = None if audios is None else self.encode_audio(audios.to(device))
        return PromptVision(features.detach(), position_ids.to(device), delta, images, id(self.visual),
                            audio=audio, audios=audios)

    def sequence_positions(self, tokens: torch.Tensor, image_grid: torch.Tensor | None,
                           videos: VideoInputs | None = None) -> tuple[torch.Tensor, int]:
        """omni_position_ids of one sequence tokens [T] with these images and videos."""
        vision = self.args.vision
        video_grid = None if videos is None else videos.grid_thw.cpu()
        seconds = [] if videos is None else list(videos.seconds_per_grid)
        return omni_position_ids(tokens, image_grid, video_grid, seconds, vision.image_token_id,
                                 vision.video_token_id, vision.spatial_merge_size,
                                 self.args.audio.position_id_per_seconds)

    def position_ids_for(
        self, input_ids: torch.Tensor, grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
        videos: VideoInputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, T] and deltas [B] of rows input_ids [B, T] with images of grid_thw [I, 3] and videos
        (row-major); padding columns (attention_mask 0) get position 0."""
        vision = self.args.vision
        batch, seq = input_ids.shape
        positions = torch.zeros(3, batch, seq, dtype=torch.long, device=input_ids.device)
        deltas = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        images = grid_thw if grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
        used_images = used_videos = 0
        for row in range(batch):
            keep = slice(None) if attention_mask is None else attention_mask[row].bool()
            tokens = input_ids[row][keep]
            image_count = _image_runs(tokens, vision.image_token_id)
            video_count = _image_runs(tokens, vision.video_token_id)
            row_videos = None if videos is None else VideoInputs(
                videos.pixel_values, videos.grid_thw[used_videos: used_videos + video_count],
                videos.seconds_per_grid[used_videos: used_videos + video_count])
            row_positions, deltas[row] = self.sequence_positions(
                tokens, images[used_images: used_images + image_count], row_videos)
            positions[:, row, keep] = row_positions.to(positions.device)
            used_images += image_count
            used_videos += video_count
        if used_images != images.shape[0]:
            raise ValueError(f"{images.shape[0]} image grids given for {used_images} images in the rows")
        if videos is not None and used_videos != videos.grid_thw.shape[0]:
            raise ValueError(f"{videos.grid_thw.shape[0]} video grids given for {used_videos} videos in the rows")
        return positions, deltas

    def audio_features_of(self, visions: Sequence[PromptVision | None]) -> torch.Tensor | None:
        """The audio features of a batch's rows, in row order: stored ones while this model's encoder made them and
        is not being trained, else computed again per prompt."""
        present = [v for v in visions if v is not None and v.audios is not None]
        if not present:
            return None
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.audio_tower.parameters())
        device = self.embed_tokens.weight.device
        return torch.cat([
            v.audio if not training and v.tower == id(self.visual) and v.audio is not None
            else self.encode_audio(v.audios.to(device))
            for v in present
        ])

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        forced_experts: Sequence[torch.Tensor | None] | None = None,
        cache: KVCache | None = None,
        packed: PackedSequences | None = None,
        images: ImageInputs | None = None,
        image_features: VisionFeatures | None = None,
        visions: Sequence[PromptVision | None] | None = None,
        audios: AudioInputs | None = None,
        audio_features: torch.Tensor | None = None,
        videos: VideoInputs | None = None,
    ) -> ModelOutput:
        """As Qwen3VLModel.forward_hidden, with the rows' audios as `audios`, as `audio_features` or in `visions`, and
        their videos as `videos` (a forward without packing or visions)."""
        if sum(given is not None for given in (audios, audio_features, visions)) > 1:
            raise ValueError("give one of audios, audio_features and visions")
        seq = input_ids.shape[1]
        check_forced_experts(self.args, forced_experts)
        if videos is not None:
            if packed is not None or visions is not None:
                raise ValueError("videos are taken by a forward without packing or visions")
            if position_ids is None and cache is None:
                grid = None if images is None else images.grid_thw
                position_ids = self.position_ids_for(input_ids, grid, attention_mask, videos)[0]
        x, cos, sin, image_mask, deepstack = self._multimodal_inputs(
            input_ids, attention_mask, position_ids, cache, packed, images, image_features, visions
        )
        if videos is not None:
            video = self.visual(videos.pixel_values, videos.grid_thw)
            video_mask = input_ids == self.args.vision.video_token_id
            if int(video_mask.sum()) != video.embeds.shape[0]:
                raise ValueError(f"the rows hold {int(video_mask.sum())} video tokens and the videos give "
                                 f"{video.embeds.shape[0]} features")
            x = x.masked_scatter(video_mask[..., None], video.embeds.to(x.dtype))
            image_mask, deepstack = joint_deepstack(image_mask, deepstack, video_mask, video.deepstack)
        if audios is not None:
            audio_features = self.encode_audio(audios)
        if visions is not None:
            audio_features = self.audio_features_of(visions)
        if audio_features is not None:
            x = place_audio(x, input_ids, self.args.audio.audio_token_id, audio_features)
        attn_mask = layer_attention_mask(attention_mask, cache, seq)

        x, routing = run_layers(self, x, (cos, sin, attn_mask), forced_experts, cache, packed,
                                lambda index, x: deepstack_after(index, x, image_mask, deepstack))
        return final_output(self, x, routing, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        forced_experts: Sequence[torch.Tensor | None] | None = None,
        packed: PackedSequences | None = None,
        images: ImageInputs | None = None,
        image_features: VisionFeatures | None = None,
        audios: AudioInputs | None = None,
        audio_features: torch.Tensor | None = None,
        videos: VideoInputs | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] in the model dtype."""
        hidden = self.forward_hidden(
            input_ids, attention_mask, position_ids, forced_experts, packed=packed, images=images,
            image_features=image_features, audios=audios, audio_features=audio_features, videos=videos,
        ).hidden_states
        return F.linear(hidden, self.lm_head_weight)
