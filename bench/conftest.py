"""Shared pieces of the benchmark suite: the device under test and how time and memory are read."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels only run in the interpreter here; the benchmarks then time the CPU paths.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gspo_engine.benchmarks.timing import copy_bandwidth_gb_per_s, peak_extra_mib, synchronize  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def copy_gb_per_s(device: torch.device) -> float | None:
    """The memory-bound ceiling on a GPU; None on CPU, where absolute figures mean little."""
    return copy_bandwidth_gb_per_s(device)


def run_benchmark(benchmark, device: torch.device, step, rounds: int) -> float | None:
    """Time `step` (synchronised) with pytest-benchmark; return its peak extra device memory in MiB."""
    peak_mib = peak_extra_mib(step, device)

    def synchronized_step():
        step()
        synchronize(device)

    benchmark.pedantic(synchronized_step, rounds=rounds, warmup_rounds=1, iterations=1)
    return peak_mib
