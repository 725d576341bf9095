"""gspo_loss forward + backward against the plain PyTorch reference (cases in gspo_engine.benchmarks.loss).

    pytest bench/test_bench_loss.py --benchmark-group-by=group --benchmark-columns=median,rounds

GB/s counts the bytes any implementation must move (loss.loss_bytes); on a GPU, next to the
device-copy bandwidth measured in the same run.
"""

import pytest

from bench.conftest import DEVICE, SCALE, benchmark_case, case_params
from gspo_engine.benchmarks import loss


@pytest.mark.parametrize("case, implementation", case_params(loss.cases(DEVICE, SCALE)))
def test_loss_forward_backward(benchmark, card_ceilings, case, implementation):
    benchmark_case(benchmark, case, implementation, card_ceilings)
