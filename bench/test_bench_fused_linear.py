"""lm_head + GSPO loss forward + backward: fused kernels, the full-logits reference, Liger-Kernel.

    pytest bench/test_bench_fused_linear.py --benchmark-group-by=group --benchmark-columns=median,rounds -s

On CPU: timings at a small shape, and the issue's side-by-side (B=4 T=512 H=512 V=151936 fp32),
each implementation in a fresh subprocess (bench/fused_linear_memory.py). On a GPU: N = B x 4096
tokens, H = 4096, V = 151936, bf16, with extra memory (torch.cuda.max_memory_allocated above
inputs and gradients) and TFLOP/s counted as 6 N H V, next to the bf16 matmul ceiling of the card.
"""

import pytest
import torch

from bench import fused_linear_memory as cases
from bench.conftest import run_benchmark
from gspo_engine.benchmarks.timing import median_seconds

CPU_SHAPE = (2, 256, 256, 32768)
GPU_HIDDEN, GPU_VOCAB, GPU_STEPS = 4096, 151936, 4096


@pytest.fixture(scope="session")
def matmul_tflops(device):
    """bf16 matmul ceiling measured on this card (GPU only)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    seconds = median_seconds(lambda: a @ a, device, rounds=20, warmup=3)
    return 2 * 8192**3 / seconds / 1e12


def implementations():
    return [pytest.param(name, marks=pytest.mark.skipif(not cases.available(name), reason=f"{name} not installed"))
            for name in cases.IMPLEMENTATIONS]


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("batch", [2, 4])
def test_fused_linear_forward_backward(benchmark, device, matmul_tflops, implementation, batch):
    if device.type == "cuda":
        shape, dtype, rounds = (batch, GPU_STEPS, GPU_HIDDEN, GPU_VOCAB), torch.bfloat16, 5
    else:
        shape, dtype, rounds = (batch, *CPU_SHAPE[1:]), torch.float32, 3
    inputs = cases.make_inputs(*shape, dtype=dtype, device=device)
    step = cases.make_step(implementation, inputs)
    step()  # gradients allocated once: the peak below is what the step adds on top of them
    batch, steps, hidden, vocab = shape
    benchmark.group = f"fused linear GSPO B={batch} T={steps} H={hidden} V={vocab} {str(dtype)[6:]} {device.type}"
    peak_mib = run_benchmark(benchmark, device, step, rounds=rounds)
    tflops = 6 * batch * steps * hidden * vocab / benchmark.stats.stats.median / 1e12
    benchmark.extra_info.update(tflops=round(tflops, 3), peak_extra_mib=peak_mib and round(peak_mib))
    if matmul_tflops:
        benchmark.extra_info.update(matmul_tflops=round(matmul_tflops, 1), fraction_of_matmul=round(tflops / matmul_tflops, 3))


def test_cpu_side_by_side_memory_and_time(device):
    """The issue's CPU targets: extra memory <= 10% of the reference's and below Liger's."""
    if device.type != "cpu":
        pytest.skip("peak RSS of a subprocess is the CPU measurement")
    impls = [name for name in cases.IMPLEMENTATIONS if cases.available(name)]
    results = cases.side_by_side((4, 512, 512, 151936), impls, repeats=1)
    print("\n" + "\n".join(cases.table(results)))
    fused, ref = results["fused"], results["reference"]
    assert fused["extra_mib"] <= 0.1 * ref["extra_mib"]
    if "liger" in results:
        assert fused["extra_mib"] < results["liger"]["extra_mib"]
