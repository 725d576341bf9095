"""The comparisons `gspo-engine bench` runs, one entry per kernel family."""

from __future__ import annotations

from typing import Callable

import torch

from gspo_engine.benchmarks import loss
from gspo_engine.benchmarks.timing import copy_bandwidth_gb_per_s, median_seconds, peak_extra_mib


def bench_loss(device: torch.device, rounds: int) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy_gb_per_s = copy_bandwidth_gb_per_s(device)
    rows = []
    for batch, length in loss.SHAPES:
        for level in ("sequence", "token"):
            inputs = loss.loss_inputs(batch, length, dtype, device)
            times = {}
            for implementation in loss.IMPLEMENTATIONS:
                step = loss.loss_step(implementation, inputs, level)
                times[implementation] = median_seconds(step, device, rounds)
                gb_per_s = loss.loss_bytes(batch, length, dtype) / times[implementation] / 1e9
                rows.append({
                    "kernel": "loss",
                    "case": f"{level} B={batch} T={length} {str(dtype).removeprefix('torch.')}",
                    "implementation": implementation,
                    "median_ms": times[implementation] * 1e3,
                    "speedup_vs_reference": None,
                    "gb_per_s": gb_per_s,
                    "fraction_of_copy_bandwidth": gb_per_s / copy_gb_per_s if copy_gb_per_s else None,
                    "peak_extra_mib": peak_extra_mib(step, device),
                })
            for row in rows[-len(times):]:
                row["speedup_vs_reference"] = times["reference"] / times[row["implementation"]]
    return rows


KERNELS: dict[str, Callable[[torch.device, int], list[dict]]] = {"loss": bench_loss}


def run_kernel_benchmarks(kernels: list[str], device: torch.device, rounds: int) -> list[dict]:
    rows = []
    for name in kernels:
        rows.extend(KERNELS[name](device, rounds))
    return rows
