"""gspo_loss forward + backward against the plain PyTorch reference (cases in gspo_engine.benchmarks.loss).

    pytest bench/test_bench_loss.py --benchmark-group-by=group --benchmark-columns=median,rounds
"""

import pytest
import torch

from bench.conftest import run_benchmark
from gspo_engine.benchmarks import loss


@pytest.mark.parametrize("implementation", list(loss.IMPLEMENTATIONS))
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("batch, length", loss.SHAPES)
def test_loss_forward_backward(benchmark, device, copy_gb_per_s, implementation, level, batch, length):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = loss.loss_step(implementation, loss.loss_inputs(batch, length, dtype, device), level)
    benchmark.group = f"gspo_loss {level} B={batch} T={length} {str(dtype).removeprefix('torch.')} {device.type}"
    peak_mib = run_benchmark(benchmark, device, step, rounds=50 if device.type == "cuda" else 10)
    gb_per_s = loss.loss_bytes(batch, length, dtype) / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(gb_per_s=round(gb_per_s, 2), peak_extra_mib=peak_mib)
    if copy_gb_per_s:
        benchmark.extra_info.update(copy_gb_per_s=round(copy_gb_per_s, 1), fraction_of_copy=round(gb_per_s / copy_gb_per_s, 3))
