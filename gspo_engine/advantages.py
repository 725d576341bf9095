"""Group-normalised advantages (GSPO eq. 6): each completion is scored against its siblings."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor  # [P * G] fp32, in the order of the rewards
    constant_groups: int  # groups whose rewards are all equal: they get A = 0 and teach nothing


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> Advantages:
    """A_i = (r_i - mean_group) / (std + eps) for rewards [P * G] laid out group after group.

    scale "group" divides by each group's std (the paper), "batch" by the std of the whole
    batch (after centring per group), "none" only centres. The std is the population std of
    the G values, so a group of equal rewards has A = 0 exactly whatever eps is.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [P * G] with G = {group_size}; got shape {tuple(rewards.shape)}")
    grouped = rewards.to(torch.float32).view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1, keepdim=True, unbiased=False)
    if scale == "group":
        values = centred / (group_std + eps)
    elif scale == "batch":
        values = centred / (centred.std(unbiased=False) + eps)
    elif scale == "none":
        values = centred
    else:
        raise ValueError(f"scale must be group, batch or none; got {scale!r}")
    constant = int((grouped == grouped[:, :1]).all(dim=1).sum())
    return Advantages(values=values.reshape(-1), constant_groups=constant)
