"""The Qwen3-VL vision tower: patches -> ViT blocks -> 2x2 merged tokens in the language model's width.

pixel_values [N, C * Tp * P * P] hold every image's patches one after the other, as the processor
(transformers' image processor) lays them out: within an image, the patches of each 2x2 merge block
are consecutive. grid_thw [I, 3] gives each image's patch grid (frames / Tp, height / P, width / P).

- Patch embedding: a Conv3d whose kernel equals its stride, i.e. one linear map of each patch.
- A learned square grid of position embeddings, bilinearly resampled (corners aligned) to each
  image's grid and added to its patches.
- 2D rotary embedding inside attention: a quarter of each head's frequencies turn with the patch's
  row, a quarter with its column (then both halves again, rotate-half layout).
- Pre-LayerNorm blocks, attention within each image frame only (no mask between images: each frame
  is its own scaled_dot_product_attention call), GELU MLP.
- The merger: LayerNorm per patch, the 4 patches of a merge block concatenated, Linear-GELU-Linear into
  the language model's width. DeepStack mergers do the same from the outputs of earlier blocks
  (deepstack_visual_indexes), with the LayerNorm after the concatenation; the language model adds
  their features to its hidden states at the image tokens after its first layers.

Module names are the checkpoints' (`patch_embed.proj`, `blocks.0.attn.qkv`, `deepstack_merger_list.0`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gspo_engine.model.rope import rotate_half
from gspo_engine.model.vision_args import VisionArgs


@dataclass
class VisionFeatures:
    """What the tower gives the language model for a set of images.

    embeds [M, H] (M = image tokens over all images, H the language model's width), deepstack one
    [M, H] per DeepStack merger, in the order the language model adds them; tokens_per_image [I].
    """

    embeds: torch.Tensor
    deepstack: list[torch.Tensor]
    tokens_per_image: list[int]

    @staticmethod
    def concat(parts: list["VisionFeatures"]) -> "VisionFeatures":
        """The images of several sets one after the other (parts must not be empty)."""
        return VisionFeatures(
            torch.cat([p.embeds for p in parts]),
            [torch.cat(layer) for layer in zip(*(p.deepstack for p in parts))],
            [count for p in parts for count in p.tokens_per_image],
        )

    def detach(self) -> "VisionFeatures":
        return VisionFeatures(self.embeds.detach(), [d.detach() for d in self.deepstack], list(self.tokens_per_image))


def check_grid(grid_thw: torch.Tensor, merge: int) -> list[tuple[int, int, int]]:
    """grid_thw [I, 3] as a list of (t, h, w), with h and w multiples of the merge size."""
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"image_grid_thw must be [images, 3], got shape {tuple(grid_thw.shape)}")
    grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    for t, h, w in grid:
        if t < 1 or h % merge or w % merge or h < 1 or w < 1:
            raise ValueError(f"image grid {(t, h, w)}: height and width must be positive multiples of {merge}")
    return grid


def merge_block_order(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column [h * w] of each patch in the processor's order (merge blocks row-major, each block row-major)."""
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
    return rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)


class PatchEmbed(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        kernel = (args.temporal_patch_size, args.patch_size, args.patch_size)
        self.proj = nn.Conv3d(args.in_channels, args.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C * Tp * P * P] -> [N, D]: the convolution covers each patch exactly once, so it is one matmul."""
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.proj.bias)


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.linear_fc1 = nn.Linear(args.hidden_size, args.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=True)
        self.approximate = "tanh" if args.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.qkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=True)
        self.proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """x [N, D]; cos / sin [N, head_dim] in fp32; lengths: the frames' patch counts, attended to separately."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        # The rotation is done in fp32 and rounded back, as transformers does.
        cos, sin = cos[:, None], sin[:, None]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, N, head_dim]
        outputs = [
            F.scaled_dot_product_attention(q_i, k_i, v_i)
            for q_i, k_i, v_i in zip(*(t.split(lengths, dim=2) for t in (q, k, v)))
        ]
        out = torch.cat(outputs, dim=2)[0].transpose(0, 1).reshape(n, -1)
        return self.proj(out)


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(args.hidden_size, eps=1e-6)
        self.attn = VisionAttention(args)
        self.mlp = VisionMLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """The patches of each merge block concatenated and projected into the language model's width.

    post_shuffle_norm: LayerNorm over the concatenation (DeepStack mergers) instead of over each patch.
    """

    def __init__(self, args: VisionArgs, post_shuffle_norm: bool):
        super().__init__()
        self.merged_size = args.hidden_size * args.spatial_merge_size**2
        self.post_shuffle_norm = post_shuffle_norm
        self.norm = nn.LayerNorm(self.merged_size if post_shuffle_norm else args.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_size, self.merged_size)
        self.linear_fc2 = nn.Linear(self.merged_size, args.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_shuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """pixel_values [N, patch_dim], grid_thw [I, 3] -> VisionFeatures (M = N / merge^2 tokens)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.pos_embed = nn.Embedding(args.num_position_embeddings, args.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(args) for _ in range(args.depth))
        self.merger = PatchMerger(args, post_shuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(args, post_shuffle_norm=True) for _ in args.deepstack_visual_indexes
        )
        # Set by the trainer's activation checkpointing switch (as ModelArgs.activation_checkpointing is).
        self.activation_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionFeatures:
        args = self.args
        merge = args.spatial_merge_size
        grid = check_grid(grid_thw, merge)
        patches = sum(t * h * w for t, h, w in grid)
        if pixel_values.dim() != 2 or pixel_values.shape != (patches, args.patch_dim):
            raise ValueError(
                f"pixel_values must be [{patches}, {args.patch_dim}] for image_grid_thw {grid}, "
                f"got shape {tuple(pixel_values.shape)}"
            )
        x = self.patch_embed(pixel_values)
        x = x + self._position_embeddings(grid).to(x.dtype)
        cos, sin = self._rotary(grid, x.device)
        lengths = [h * w for t, h, w in grid for _ in range(t)]
        deepstack = []
        for index, block in enumerate(self.blocks):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, lengths, use_reentrant=False)
            else:
                x = block(x, cos, sin, lengths)
            if index in args.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[args.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(x))
        tokens = [t * h * w // merge**2 for t, h, w in grid]
        return VisionFeatures(self.merger(x), deepstack, tokens)

    def _position_embeddings(self, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        """[N, D]: the learned side x side grid resampled bilinearly (corners aligned) to each image's h x w."""
        side = int(self.args.num_position_embeddings**0.5)
        table = self.pos_embed.weight
        device = table.device
        out = []
        for t, h, w in grid:
            rows, cols = merge_block_order(h, w, self.args.spatial_merge_size)
            row_taps, row_weights = _bilinear_taps(rows.to(device), h, side)
            col_taps, col_weights = _bilinear_taps(cols.to(device), w, side)
            index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
            weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
            embeds = (table[index] * weight[:, :, None].to(table.dtype)).sum(1)
            out.append(embeds.repeat(t, 1))
        return torch.cat(out)

    def _rotary(self, grid: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] fp32 of each patch's (row, column)."""
        quarter = self.args.head_dim // 2
        inv_freq = 1.0 / (self.args.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter))
        angles = []
        for t, h, w in grid:
            rows, cols = merge_block_order(h, w, self.args.spatial_merge_size)
            both = torch.cat((rows.to(device)[:, None] * inv_freq, cols.to(device)[:, None] * inv_freq), dim=-1)
            angles.append(both.repeat(t, 1))
        angles = torch.cat(angles)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def tower_parts(tower: VisionTower) -> list[nn.Module]:
    """The tower's parts in the order they run, each to be sharded on its own (distributed/parallel.py) and planned
    so (planner/memory_model.py): each block, the merger, each DeepStack merger, and the tower itself last, which
    then holds what is left (the patch and position embeddings)."""
    return [*tower.blocks, tower.merger, *tower.deepstack_merger_list, tower]


def _bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two source positions [n, 2] on a side-long axis for target positions index of a size-long one, and weights."""
    source = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
    floor = source.floor()
    taps = floor.long()[:, None] + torch.arange(2, device=index.device)
    weights = (1 - (source[:, None] - taps.to(torch.float32)).abs()).clamp(min=0)
    return taps.clamp(0, side - 1), weights
