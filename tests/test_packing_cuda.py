"""Packed attention on CUDA (the GPU check runs this file): FlexAttention's compiled document-mask kernel, and
flash-attn's varlen kernel where it is installed, against the float64 block-diagonal reference."""

from __future__ import annotations

import pytest
import torch
from test_packing import reference_attention

from gspo_engine.model import PackedSequences
from gspo_engine.model.packed import _flash_varlen, default_backend, packed_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Qwen3's attention: head dim 128, grouped-query heads; lengths that straddle FlexAttention's 128-token blocks.
LENGTHS = [1, 77, 300, 5, 129]
TOLERANCES = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["flex", "flash_varlen", "segments"])
def test_packed_attention_on_cuda_matches_a_float64_reference(backend, dtype):
    if backend == "flash_varlen" and (dtype == torch.float32 or _flash_varlen() is None):
        pytest.skip("flash-attn's varlen kernel takes fp16 / bf16 and needs flash-attn installed")
    torch.manual_seed(0)
    total, heads, kv_heads, dim = sum(LENGTHS), 8, 4, 128
    leaves = [torch.randn(1, n, total, dim, device="cuda", dtype=dtype, requires_grad=True)
              for n in (heads, kv_heads, kv_heads)]
    packed = PackedSequences.from_lengths(LENGTHS, device="cuda")
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    expected = reference_attention(*leaves64, LENGTHS)
    got = packed_attention(*leaves, packed, heads // kv_heads, backend=backend)
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(got.cpu().double(), expected, atol=tolerance, rtol=tolerance)
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), leaves64)
    got_grads = torch.autograd.grad((got * weights.to(got)).sum(), leaves)
    for name, g, e in zip("qkv", got_grads, expected_grads):
        torch.testing.assert_close(g.cpu().double(), e, atol=tolerance * 4, rtol=tolerance, msg=lambda m: f"d{name}: {m}")


def test_the_cuda_default_is_a_fused_kernel():
    q = torch.zeros(1, 2, 4, 8, device="cuda", dtype=torch.bfloat16)
    assert default_backend(q) == ("flash_varlen" if _flash_varlen() is not None else "flex")
