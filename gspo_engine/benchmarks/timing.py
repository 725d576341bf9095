"""Timing, memory and ceiling readings that mean the same on CPU and GPU."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from gspo_engine.device import synchronize


def median_seconds(step: Callable[[], None], device: torch.device, rounds: int, warmup: int = 1) -> float:
    """Median wall time of `step` over `rounds` synchronised calls, after `warmup` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_mib(step: Callable[[], None], device: torch.device) -> float | None:
    """Device memory `step` allocates above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gb_per_s(device: torch.device) -> float | None:
    """Measured device-to-device copy bandwidth, bytes read + written per second (GPU only)."""
    if device.type != "cuda":
        return None
    source = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, rounds=20, warmup=3)
    return 2 * source.numel() / seconds / 1e9


def matmul_tflops(device: torch.device, size: int = 8192) -> float | None:
    """Measured bf16 matmul ceiling, 2 * size^3 FLOPs per product on random data (GPU only)."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    seconds = median_seconds(lambda: a @ b, device, rounds=20, warmup=3)
    return 2 * size**3 / seconds / 1e12


def ceilings(device: torch.device) -> dict[str, float | None]:
    """What the rows' fraction_of_ceiling divides by: None on CPU, where absolute figures mean little."""
    return {"copy_gb_per_s": copy_bandwidth_gb_per_s(device), "matmul_tflops": matmul_tflops(device)}
