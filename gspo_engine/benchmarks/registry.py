"""The comparisons `gspo-engine bench` runs, one entry per family, each a list of cases."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from gspo_engine.benchmarks import e2e, e2e_spread, fused_linear, gated_deltanet, loss, moe
from gspo_engine.benchmarks.cases import Case, run_case


def e2e_cases(device: torch.device, scale: str) -> list[Case]:
    """The update and the rollouts at fixed lengths, then the update at spread lengths (packed / padded),
    the largest rollout batch last: transformers' generate there takes longest, so a run cut short by
    its time limit loses that row rather than the spread update's."""
    update, *rollouts = e2e.cases(device, scale)
    return [update, *rollouts[:-1], *e2e_spread.cases(device, scale), *rollouts[-1:]]


FAMILIES: dict[str, Callable[[torch.device, str], list[Case]]] = {
    "loss": loss.cases,
    "fused-linear": fused_linear.cases,
    "moe": moe.cases,
    "gated-deltanet": gated_deltanet.cases,
    "e2e": e2e_cases,
}


def default_scale(device: torch.device) -> str:
    """Full shapes on a GPU; shapes that finish in seconds to minutes on a CPU."""
    return "gpu" if device.type == "cuda" else "cpu"


def run_benchmarks(families: list[str], device: torch.device, rounds: int, scale: str,
                   ceilings: dict[str, float | None]) -> Iterator[dict]:
    """The rows of every case of `families`, yielded as each case finishes."""
    for family in families:
        for case in FAMILIES[family](device, scale):
            yield from run_case(case, device, rounds, ceilings)
