"""Multimodal RoPE of Qwen3-VL: three position ids per token (time, row, column), their frequencies interleaved.

Text tokens have the same position in all three (t = h = w = their index, continuing from where the
previous image left off). An image of llm grid t x h x w (after the 2x2 merge) starting at position
p gives its tokens (p + t_i, p + h_i, p + w_i), and the text after it resumes at p + max(h, w), as
transformers' get_rope_index does, so a prompt with images ends at a position below its length:
`delta` = max position + 1 - length, and generated tokens continue at (length + delta) onwards.

The rotary frequencies are Qwen3's; frequency j turns with the row position when j % 3 == 1 and
j < 3 * mrope_section[1], with the column when j % 3 == 2 and j < 3 * mrope_section[2], else with time.
"""

from __future__ import annotations

import torch

from gspo_engine.model.args import ModelArgs
from gspo_engine.model.rope import inverse_frequencies
from gspo_engine.model.vision_args import DEFAULT_MROPE_SECTION


def mrope_position_ids(
    input_ids: torch.Tensor, grid_thw: torch.Tensor | None, image_token_id: int, merge: int
) -> tuple[torch.Tensor, int]:
    """position_ids [3, T] (int64) of one sequence without padding, and its delta (an int).

    input_ids [T]; grid_thw [I, 3] of the sequence's images in order (None or [0, 3] without images).
    Each run of image tokens is one image and must hold exactly t * h * w / merge^2 tokens.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"mrope_position_ids takes one sequence [T], got shape {tuple(input_ids.shape)}")
    grids = [] if grid_thw is None else [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    is_image = (input_ids == image_token_id).tolist()
    device = input_ids.device
    pieces: list[torch.Tensor] = []
    position, index, image = 0, 0, 0
    length = len(is_image)
    while index < length:
        run_end = index
        while run_end < length and is_image[run_end] == is_image[index]:
            run_end += 1
        run = run_end - index
        if not is_image[index]:
            pieces.append((torch.arange(run, device=device) + position).expand(3, run))
            position += run
        else:
            if image >= len(grids):
                raise ValueError(f"the sequence has more runs of image tokens than the {len(grids)} image grids given")
            t, h, w = grids[image][0], grids[image][1] // merge, grids[image][2] // merge
            if run != t * h * w:
                raise ValueError(
                    f"image {image} has grid {grids[image]}: {t * h * w} image tokens expected, the sequence has {run}"
                )
            grid = torch.stack(torch.meshgrid(
                torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device),
                indexing="ij",
            )).reshape(3, -1)
            pieces.append(grid + position)
            position += max(h, w)
            image += 1
        index = run_end
    if image != len(grids):
        raise ValueError(f"{len(grids)} image grids given for {image} runs of image tokens")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long, device=device)
    delta = (int(positions.max()) + 1 - length) if length else 0
    return positions.long(), delta


def mrope_section(args: ModelArgs) -> list[int]:
    return list(args.rope_extra.get("mrope_section") or DEFAULT_MROPE_SECTION)


def mrope_cos_sin(args: ModelArgs, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] for position_ids [3, B, T], cast to the activations' dtype."""
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"multimodal position_ids must be [3, B, T], got shape {tuple(position_ids.shape)}")
    seq_len = 0  # only "dynamic" scaling reads it, and reading it waits for the device
    if args.rope_scaling is not None and args.rope_scaling.rope_type == "dynamic":
        seq_len = int(position_ids.max()) + 1
    inv_freq, attention_factor = inverse_frequencies(args, seq_len, position_ids.device)
    freqs = position_ids[..., None].to(torch.float32) * inv_freq  # [3, B, T, dim / 2]
    section = mrope_section(args)
    which = torch.zeros(inv_freq.shape[0], dtype=torch.long, device=position_ids.device)
    for axis in (1, 2):
        which[axis : section[axis] * 3 : 3] = axis
    chosen = freqs.gather(0, which.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
    angles = torch.cat((chosen, chosen), dim=-1)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)
