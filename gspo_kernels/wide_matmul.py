"""Matmuls of bf16 / fp16 operands with an fp32 result, straight from cuBLAS's fp32 accumulator.

The lm_head's tiles need fp32 logits (a bf16 logit of 20 is off by up to 0.06, and so is the
log-prob), and its gradients sum in fp32. A plain matmul of half operands rounds its result to
their dtype, so getting fp32 back costs a rounding and a conversion pass over the tile, and
adding a product into an fp32 accumulator one more pass. torch >= 2.8 has an `out_dtype`
overload of mm and addmm that returns cuBLAS's fp32 accumulator directly (CUDA only); early
versions mishandled `out=` (pytorch issue #154086). Whether it is there and right is probed
once per device type and dtype, on small random operands against an fp32 matmul; where it is
not, these functions fall back to the rounding path, so results never depend on the probe.
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)

_supported: dict[tuple[str, str, torch.dtype], bool] = {}


def _probe(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b, acc = (torch.randn(shape, generator=gen) for shape in ((24, 40), (40, 16), (24, 16)))
    expected = (a.to(dtype).double() @ b.to(dtype).double()).float()
    a, b, acc = a.to(device, dtype), b.to(device, dtype), acc.to(device)
    try:
        # the layouts the lm_head uses: the weight's rows transposed (mm), d logits transposed (addmm)
        if kind == "mm":
            got = torch.mm(a, b.t().contiguous().t(), out_dtype=torch.float32)
        else:
            expected = expected + acc.cpu()
            got = acc.clone()
            torch.addmm(got, a.t().contiguous().t(), b, out_dtype=torch.float32, out=got)
    except (RuntimeError, TypeError):  # missing overloads raise TypeError (old torch) or RuntimeError subclasses
        return False
    return got.dtype == torch.float32 and torch.allclose(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def supported(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `kind` ("mm" or "addmm") gives a correct fp32 result for `dtype` operands on `device`."""
    if dtype not in HALF_DTYPES:
        return False
    key = (kind, device.type, dtype)
    if key not in _supported:
        _supported[key] = _probe(kind, device, dtype)
    return _supported[key]


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 (fp64 for fp64 operands): unrounded where supported, else the product converted."""
    if supported("mm", a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(torch.promote_types(a.dtype, torch.float32))


def add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b in place, for operands in out's dtype or half operands into an fp32 `out`."""
    if out.dtype == a.dtype:
        return out.addmm_(a, b)
    if out.dtype == torch.float32 and supported("addmm", a.device, a.dtype):
        return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    return out.add_(torch.mm(a, b).to(out.dtype))
