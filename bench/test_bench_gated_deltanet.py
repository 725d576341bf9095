"""One Gated DeltaNet layer (Qwen3-Next's linear attention) forward + backward: ours against transformers'.

    pytest bench/test_bench_gated_deltanet.py --benchmark-group-by=group --benchmark-columns=median,min,rounds

CPU: our chunked PyTorch rule against transformers' PyTorch fallback (B = 2, T = 1024, H = 256, 4 key /
8 value heads of 32). GPU (bf16): flash-linear-attention's kernels (fla-core) against transformers'
fallback at a Qwen3-Next-80B-A3B layer (H = 2048, 16 key / 32 value heads of 128, B = 4, T = 4096).
Cases and implementations: gspo_engine/benchmarks/gated_deltanet.py.
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import DEVICE, SCALE, benchmark_case, case_params
from gspo_engine.benchmarks import gated_deltanet


@pytest.mark.parametrize("case, implementation", case_params(gated_deltanet.cases(DEVICE, SCALE)))
def test_gated_deltanet_forward_backward(benchmark, card_ceilings, case, implementation):
    benchmark_case(benchmark, case, implementation, card_ceilings)


def test_both_implementations_compute_the_same_layer():
    """The two rows time the same function: the input gradients (through every weight and the rule) agree."""
    shape = gated_deltanet.SHAPES["smoke"][0][1:]
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    input_grads = []
    for name in gated_deltanet.IMPLEMENTATIONS:
        setup = gated_deltanet.make_layer(*shape, DEVICE, dtype)
        gated_deltanet.forward_backward_step(setup, name)()
        input_grads.append(setup["x"].grad.float())
    ours, theirs = input_grads
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (ours - theirs).norm() / theirs.norm() < tolerance
