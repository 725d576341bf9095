"""gspo_kernels.wide_matmul: fp32 results from half operands, probed, with a rounding fallback."""

import pytest
import torch

from gspo_kernels import wide_matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def operands(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b, acc = (torch.randn(shape, generator=gen) for shape in ((37, 300), (300, 45), (37, 45)))
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), acc.to(DEVICE)


def exact(a, b):
    return (a.double() @ b.double()).cpu()


def rel_err(value, expected):
    return float((value.double().cpu() - expected).norm() / expected.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_products_match_float64_and_accumulate_in_place(dtype):
    a, b, acc = operands(dtype)
    product = wide_matmul.mm_fp32(a, b)
    assert product.dtype == torch.float32
    # unrounded on a GPU that supports it; rounded to the operands' dtype (~2^-9 relative) otherwise
    wide = wide_matmul.supported("mm", a.device, dtype)
    assert rel_err(product, exact(a, b)) < (1e-6 if wide or dtype == torch.float32 else 1e-2)
    expected = acc.double().cpu() + exact(a, b)
    pointer = acc.data_ptr()
    wide_matmul.add_product_(acc, a, b)
    assert acc.data_ptr() == pointer and acc.dtype == torch.float32
    assert rel_err(acc, expected) < (1e-6 if dtype == torch.float32 or wide_matmul.supported("addmm", a.device, dtype)
                                     else 1e-2)


def test_only_half_operands_are_ever_probed_and_a_cpu_falls_back():
    assert not wide_matmul.supported("mm", torch.device("cpu"), torch.float32)
    assert not wide_matmul.supported("mm", torch.device("cpu"), torch.bfloat16)  # aten::mm.dtype is CUDA-only


@pytest.mark.parametrize("kind", ["mm", "addmm"])
def test_the_probe_refuses_an_overload_that_computes_the_wrong_thing(monkeypatch, kind):
    real = getattr(torch, kind)

    def overload(*args, out_dtype=None, out=None, wrong=False, **kwargs):
        if out_dtype is None:
            return real(*args, out=out, **kwargs) if out is not None else real(*args, **kwargs)
        operands_ = [t.double() for t in args]
        result = (operands_[0] @ operands_[1] if kind == "mm" else operands_[0] + operands_[1] @ operands_[2]).float()
        if wrong:
            result = result + 1.0
        if out is not None:
            return out.copy_(result)
        return result

    for wrong, verdict in ((False, True), (True, False)):
        monkeypatch.setattr(wide_matmul, "_supported", {})  # restored after the test, with whatever it cached
        monkeypatch.setattr(torch, kind, lambda *args, **kwargs: overload(*args, wrong=wrong, **kwargs))
        assert wide_matmul.supported(kind, torch.device("cpu"), torch.bfloat16) is verdict


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_with_torch_2_10_or_later_gets_unrounded_fp32_products():
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    if version < (2, 10):
        pytest.skip(f"torch {torch.__version__}: the out_dtype overloads may be missing or mishandle out=")
    assert wide_matmul.supported("mm", DEVICE, torch.bfloat16)
    assert wide_matmul.supported("addmm", DEVICE, torch.bfloat16)
