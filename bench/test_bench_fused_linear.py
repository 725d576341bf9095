"""lm_head + GSPO loss forward + backward: fused kernels, the full-logits reference, Liger-Kernel.

    pytest bench/test_bench_fused_linear.py --benchmark-group-by=group --benchmark-columns=median,rounds -s

Cases and implementations: gspo_engine/benchmarks/fused_linear.py. On CPU: timings at a small
shape, and the side-by-side at the CPU target shape (B=4 T=512 H=512 V=151936 fp32), each implementation in a
fresh subprocess (bench/fused_linear_memory.py). On a GPU: N = 4 x 4096 tokens, H = 4096,
V = 151936, bf16, with extra memory (torch.cuda.max_memory_allocated above inputs and
gradients) and TFLOP/s counted as 6 N H V, next to the bf16 matmul ceiling of the card.
"""

import pytest

from bench import fused_linear_memory
from bench.conftest import DEVICE, SCALE, benchmark_case, case_params
from gspo_engine.benchmarks import fused_linear


@pytest.mark.parametrize("case, implementation", case_params(fused_linear.cases(DEVICE, SCALE)))
def test_fused_linear_forward_backward(benchmark, card_ceilings, case, implementation):
    benchmark_case(benchmark, case, implementation, card_ceilings)


def test_cpu_side_by_side_memory_and_time(device):
    """The CPU targets: extra memory <= 10% of the reference's and below Liger's."""
    if device.type != "cpu":
        pytest.skip("peak RSS of a subprocess is the CPU measurement")
    impls = [name for name in fused_linear.IMPLEMENTATIONS if fused_linear.available(name)]
    results = fused_linear_memory.side_by_side((4, 512, 512, 151936), impls, repeats=1)
    print("\n" + "\n".join(fused_linear_memory.table(results)))
    fused, ref = results["fused"], results["reference"]
    assert fused["extra_mib"] <= 0.1 * ref["extra_mib"]
    if "liger" in results:
        assert fused["extra_mib"] < results["liger"]["extra_mib"]
