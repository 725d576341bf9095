"""When flash-linear-attention's gated backward is refused (Hopper, Triton >= 3.4.0 and < 3.7.1, no tilelang),
training calls of the Gated DeltaNet rule run our chunked PyTorch rule; calls without gradients keep fla."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from gspo_engine.model import fla_backend


@pytest.fixture
def fake_fla(monkeypatch):
    """A stand-in for fla.utils with the flags fla-core 0.6 reads, and no tilelang."""
    def install(hopper: bool, above_3_4_0: bool, above_3_7_1: bool, tilelang: bool = False):
        package = types.ModuleType("fla")
        utils = types.ModuleType("fla.utils")
        utils.IS_NVIDIA_HOPPER, utils.TRITON_ABOVE_3_4_0, utils.TRITON_ABOVE_3_7_1 = hopper, above_3_4_0, above_3_7_1
        package.utils = utils
        monkeypatch.setitem(sys.modules, "fla", package)
        monkeypatch.setitem(sys.modules, "fla.utils", utils)
        real_find_spec = fla_backend.importlib.util.find_spec
        monkeypatch.setattr(fla_backend.importlib.util, "find_spec",
                            lambda name, *a: object() if name == "tilelang" and tilelang else
                            (None if name == "tilelang" else real_find_spec(name, *a)))
        fla_backend.gated_backward_refusal.cache_clear()
        fla_backend._warn_once.cache_clear()
    yield install
    fla_backend.gated_backward_refusal.cache_clear()
    fla_backend._warn_once.cache_clear()


@pytest.mark.parametrize("hopper, above_3_4_0, above_3_7_1, tilelang, refused", [
    (True, True, False, False, True),    # H100 / H200 with Triton 3.4 - 3.7.0: fla raises in the backward
    (True, True, False, True, False),    # tilelang installed: fla runs that kernel from tilelang
    (True, True, True, False, False),    # Triton >= 3.7.1
    (True, False, False, False, False),  # Triton < 3.4
    (False, True, False, False, False),  # not Hopper
])
def test_the_refusal_mirrors_fla_s_condition(fake_fla, hopper, above_3_4_0, above_3_7_1, tilelang, refused):
    fake_fla(hopper, above_3_4_0, above_3_7_1, tilelang)
    reason = fla_backend.gated_backward_refusal()
    assert (reason is not None) == refused
    if refused:
        assert "#640" in reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fla_backend.use_for(needs_grad=False)
        assert fla_backend.use_for(needs_grad=True) is not refused
        assert fla_backend.use_for(needs_grad=True) is not refused
    messages = [str(w.message) for w in caught]
    assert len(messages) == (1 if refused else 0)  # once per process, not per layer call
    if refused:
        assert "pip install tilelang" in messages[0] and "Triton >= 3.7.1" in messages[0]


def test_without_fla_nothing_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla.utils", None)  # import fails
    fla_backend.gated_backward_refusal.cache_clear()
    try:
        assert fla_backend.gated_backward_refusal() is None
    finally:
        fla_backend.gated_backward_refusal.cache_clear()


def test_cpu_calls_run_the_pytorch_rule_whatever_fla_would_do(fake_fla, monkeypatch):
    from gspo_engine.model import gated_delta_rule as rule

    fake_fla(hopper=True, above_3_4_0=True, above_3_7_1=False)
    called = []
    monkeypatch.setattr(rule, "fla_chunk_gated_delta_rule", lambda *a, **k: called.append(1))
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    v, beta = torch.randn(1, 5, 2, 8, requires_grad=True), torch.rand(1, 5, 2)
    g = -torch.rand(1, 5, 2)
    out, _ = rule.gated_delta_rule(q, k, v, g, beta)
    assert out.shape == (1, 5, 2, 8) and not called
