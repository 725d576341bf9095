"""The Qwen3-Omni thinker's multimodal positions: time-aligned for videos, as its get_rope_index lays them out.

Text and audio tokens take consecutive positions (t = h = w), continuing from the previous piece. The
tokens of an image or a video of llm grid t x h x w starting at position p get (p + time_i, p + h_i, p + w_i),
where time counts position_id_per_seconds per second: a video's temporal patch i lasts seconds_per_grid
seconds, so time_i = i * seconds_per_grid * position_id_per_seconds (an image has one patch, time 0). The text
after them resumes at their largest position + 1. An audio inside a video (interleaved by time) is not
supported.
"""

from __future__ import annotations

import torch


def omni_position_ids(
    input_ids: torch.Tensor, image_grid: torch.Tensor | None, video_grid: torch.Tensor | None,
    video_seconds: list[float], image_token_id: int, video_token_id: int, merge: int, per_second: float,
) -> tuple[torch.Tensor, int]:
    """position_ids [3, T] (int64) of one sequence input_ids [T] without padding, and its delta (an int).

    image_grid [I, 3] / video_grid [V, 3]: the grids of its images / videos in order (None without);
    video_seconds: each video's seconds per temporal patch. A video whose time steps fall between integer
    positions is refused (transformers would give it fractional positions).
    """
    if input_ids.dim() != 1:
        raise ValueError(f"omni_position_ids takes one sequence [T], got shape {tuple(input_ids.shape)}")
    grids = {
        image_token_id: [] if image_grid is None else [tuple(int(v) for v in row) for row in image_grid.tolist()],
        video_token_id: [] if video_grid is None else [tuple(int(v) for v in row) for row in video_grid.tolist()],
    }
    if len(video_seconds) != len(grids[video_token_id]):
        raise ValueError(f"{len(video_seconds)} seconds per grid given for {len(grids[video_token_id])} video grids")
    steps = {image_token_id: [per_second] * len(grids[image_token_id]),
             video_token_id: [seconds * per_second for seconds in video_seconds]}
    used = {image_token_id: 0, video_token_id: 0}
    tokens = input_ids.tolist()
    device = input_ids.device
    pieces: list[torch.Tensor] = []
    position, index = 0, 0
    while index < len(tokens):
        kind = tokens[index] if tokens[index] in grids else None
        end = index
        while end < len(tokens) and (tokens[end] if tokens[end] in grids else None) == kind:
            end += 1
        run = end - index
        if kind is None:
            pieces.append((torch.arange(run, device=device) + position).expand(3, run))
            position += run
        else:
            name = "image" if kind == image_token_id else "video"
            number = used[kind]
            if number >= len(grids[kind]):
                raise ValueError(f"the sequence has more runs of {name} tokens than the {len(grids[kind])} {name} grids")
            t, h, w = grids[kind][number][0], grids[kind][number][1] // merge, grids[kind][number][2] // merge
            if run != t * h * w:
                raise ValueError(f"{name} {number} has grid {grids[kind][number]}: {t * h * w} tokens expected, "
                                 f"the sequence has {run}")
            step = steps[kind][number]
            if not float(step).is_integer():
                raise ValueError(f"{name} {number}: {step} positions per temporal patch is not a whole number")
            time = torch.arange(t, device=device) * int(step)
            grid = torch.stack(torch.meshgrid(
                time, torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij",
            )).reshape(3, -1)
            pieces.append(grid + position)
            position += int(grid.max()) + 1
            used[kind] += 1
        index = end
    for kind, name in ((image_token_id, "image"), (video_token_id, "video")):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {name} grids given for {used[kind]} runs of {name} tokens")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long, device=device)
    delta = (int(positions.max()) + 1 - len(tokens)) if tokens else 0
    return positions.long(), delta
