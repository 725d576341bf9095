"""AdamW runs fused where every trained tensor is on CUDA, the foreach default elsewhere."""

from __future__ import annotations

import pytest
import torch

from gspo_engine.config import OptimConfig
from gspo_engine.optim import build_optimizer, fused_on


def test_fused_only_when_every_tensor_is_on_cuda():
    cpu = torch.zeros(2)
    assert not fused_on([cpu]) and not fused_on([])
    assert fused_on([torch.zeros(2, device="meta")]) is False

    class OnCuda:  # the one property fused_on reads, without a GPU here
        device = torch.device("cuda", 0)

    assert fused_on([OnCuda(), OnCuda()]) and not fused_on([OnCuda(), cpu])


def test_cpu_parameters_keep_the_foreach_adamw():
    weight = torch.nn.Parameter(torch.randn(3, 3))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    optimizer = build_optimizer([weight, frozen], OptimConfig())
    assert optimizer.defaults["fused"] is None
    assert [p for group in optimizer.param_groups for p in group["params"]] == [weight]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parameters_step_fused_like_the_foreach_adamw():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 32, device="cuda")) for _ in range(2)]
    reference = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    config = OptimConfig()
    fused = build_optimizer(weights, config)
    foreach = torch.optim.AdamW(reference, lr=config.learning_rate, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay, foreach=True)
    assert fused.defaults["fused"]
    for _ in range(3):
        for group in (weights, reference):
            for w in group:
                w.grad = torch.ones_like(w) * 0.5
        fused.step()
        foreach.step()
    for a, b in zip(weights, reference):
        torch.testing.assert_close(a, b)
