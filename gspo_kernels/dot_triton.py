"""How the Triton kernels multiply: the `tl.dot` input precision for each input dtype.

bf16 and fp16 operands go to the tensor cores as they are ("tf32" only matters for fp32).
fp32 operands are multiplied as three TF32 products ("tf32x3": the high and low halves of each
operand, the low-by-low product dropped), on the tensor cores too, which matches fp32's accuracy
to about 1e-6 relative where one TF32 product would lose about 1e-3. Full fp32 ("ieee") would run
on the FMA units at a fraction of the speed, and Triton keeps whole operand tiles in registers
for it: with Triton 3.9 on sm_80 the fused-linear kernels compiled to 32 registers and 5-10 KB of
local memory per thread (its PTX loads each K step's operands as 128-bit vectors before the
4,096 FMAs that use them, where 3.6 loaded them 32 bits at a time next to their uses; the same
PTX gives the same result with either version's ptxas).
"""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`."""
    return "tf32x3" if dtype == torch.float32 else "tf32"
