"""MoE experts forward+backward: gk.moe_experts against transformers' Qwen3-MoE experts and the reference.

    pytest bench/test_bench_moe.py --benchmark-group-by=group --benchmark-columns=median,min,rounds

CPU: the PyTorch path at the CPU target shape (N = 4096, E = 128, k = 8, H = 256, I = 128).
GPU (bf16): the Triton kernels at a Qwen3-30B-A3B layer (E = 128, k = 8, H = 2048, I = 768) for
N = 256, 4096, 16384 and a Qwen3-235B-A22B layer (H = 4096, I = 1536) at N = 8192, next to
transformers' grouped_mm and eager experts, and the per-expert reference loop. Cases, FLOPs and
implementations: gspo_engine/benchmarks/moe.py. Each result carries TFLOP/s in extra_info, on
GPU next to the bf16 matmul ceiling measured in the same run, and the activation memory autograd
saves for backward. Each shape's routing case (router linear, softmax, top-k, forward + backward) runs
beside it, so the routing's share of a layer is in the same table.
"""

from __future__ import annotations

import pytest
import torch

import gspo_kernels as gk
from bench.conftest import DEVICE, SCALE, benchmark_case, case_params
from gspo_engine.benchmarks import moe

CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32


@pytest.mark.parametrize("case, implementation", case_params(moe.cases(DEVICE, SCALE)))
def test_experts_forward_backward(benchmark, card_ceilings, case, implementation):
    benchmark_case(benchmark, case, implementation, card_ceilings)
    if case.unit != "TFLOP/s":
        return  # a routing case: the router, softmax and top-k, no experts' activations to count
    shape = {label: sizes for label, *sizes in moe.SHAPES[SCALE]}[case.name.split()[0]]
    layer = moe.make_layer(*shape, DEVICE, DTYPE)
    saved_mib = moe.saved_for_backward_mib(*moe.experts_forward(layer, implementation))
    benchmark.extra_info.update(saved_for_backward_mib=round(saved_mib, 1))


@pytest.mark.skipif(not CUDA, reason="the share of routing in a layer only means something on the GPU")
@pytest.mark.parametrize("shape", moe.SHAPES["gpu"][:3], ids=lambda shape: shape[0])
def test_routing_share_of_the_layer(benchmark, shape):
    """Routing (softmax + top-k), the permutation and its tile table against the experts' forward+backward."""
    import triton.testing

    from gspo_kernels import moe_triton

    label, tokens, experts, top_k, hidden, intermediate = shape
    layer = moe.make_layer(tokens, experts, top_k, hidden, intermediate, DEVICE, DTYPE)
    logits = torch.randn(tokens, experts, device=DEVICE, dtype=DTYPE)

    def route_and_permute() -> gk.ExpertOrder:
        _, idx = gk.moe_route(logits, top_k)
        order = moe_triton.sort_by_expert(idx, experts)
        moe_triton.tile_table(order, moe_triton.block_rows(tokens * top_k, experts))
        return order

    layer_ms = triton.testing.do_bench(moe.forward_backward_step(layer, "gspo_kernels"))
    routing_ms = benchmark.pedantic(lambda: triton.testing.do_bench(route_and_permute), rounds=1)
    benchmark.group = f"moe-routing-{label} {str(DTYPE).removeprefix('torch.')} cuda"
    benchmark.extra_info.update(routing_ms=routing_ms, layer_ms=layer_ms, share=routing_ms / layer_ms)
