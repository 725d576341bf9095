"""One GSPO update step and one rollout batch, gspo_engine against transformers + TRL-style loss.

    pytest bench/test_bench_e2e.py --benchmark-group-by=group --benchmark-columns=median,rounds

The model, both ways of running it and the FLOPs behind MFU: gspo_engine/benchmarks/e2e.py.
GPU: Qwen3-30B-A3B's widths at 4 layers, bf16. CPU: narrower widths, fp32. tokens/s counts the
update's B x T tokens, the rollout's generated tokens, and for the update at spread completion
lengths (gspo_engine/benchmarks/e2e_spread.py: packed, padded, transformers) the real tokens.
"""

import pytest

from bench.conftest import DEVICE, SCALE, benchmark_case, case_params
from gspo_engine.benchmarks.registry import FAMILIES


@pytest.mark.parametrize("case, implementation", case_params(FAMILIES["e2e"](DEVICE, SCALE)))
def test_e2e(benchmark, card_ceilings, case, implementation):
    benchmark_case(benchmark, case, implementation, card_ceilings)
