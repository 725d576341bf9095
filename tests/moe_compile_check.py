"""Compile the MoE Triton kernels for an NVIDIA target on a machine without a GPU.

    python tests/moe_compile_check.py 90      # sm_90 (H100 / H200), bf16

Run without TRITON_INTERPRET. Prints one JSON line per kernel: its name, shared memory, whether
its loads are software-pipelined (cp.async) and whether its dots use Hopper's wgmma. The argument
specialisations are the ones the JIT infers at a real launch on Qwen3 shapes: 16-byte aligned
pointers, unit strides turned into constants, dimensions and row strides divisible by 16.
"""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gspo_kernels import moe_triton

UNIT_STRIDES = {"stride_xh", "stride_ak", "stride_dyh", "stride_wi", "stride_am", "stride_bn", "stride_on"}
DIVISIBLE_BY_16 = {
    "H", "I", "K", "M", "N", "N_GROUPS", "stride_ln", "stride_xn", "stride_we", "stride_wo", "stride_wh",
    "stride_wk", "stride_as", "stride_dyn", "stride_bs", "stride_oe", "stride_om",
}
TRAINING_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)


def compile_kernel(kernel, pointers: dict, constexprs: dict, target: GPUTarget, num_warps=4, num_stages=3) -> dict:
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constexprs = dict(constexprs)
    constexprs.update({name: 1 for name in fn.arg_names if name in UNIT_STRIDES})
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "i32")
            if name in pointers or name in DIVISIBLE_BY_16:
                attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target,
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ttgir = compiled.asm["ttgir"]
    return {
        "kernel": fn.__name__,
        "gemm": "tt.dot" in ttgir or "warp_group_dot" in ttgir,
        "shared_bytes": compiled.metadata.shared,
        "pipelined": "async_copy_global_to_local" in ttgir,
        "wgmma": "warp_group_dot" in ttgir,
    }


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    bf16, rows = "*bf16", dict(sorted_pair_ptr="*i32", tiles_ptr="*i32")
    cases = [
        (moe_triton._route_topk_kernel, dict(logits_ptr=bf16, weights_ptr="*fp32", idx_ptr="*i64", forced_ptr="*i64"),
         dict(TOP_K=8, K_PAD=8, E_PAD=128, BLOCK_T=32, NORMALIZE=True, FORCED=False)),
        (moe_triton._count_experts_kernel, dict(idx_ptr="*i64", block_counts_ptr="*i32"), dict(BLOCK_P=128, E_PAD=128)),
        (moe_triton._place_pairs_kernel, dict(idx_ptr="*i64", block_base_ptr="*i32", sorted_pair_ptr="*i32"),
         dict(BLOCK_P=128)),
        (moe_triton._tile_table_kernel, dict(counts_ptr="*i32", starts_ptr="*i32", tiles_ptr="*i32"),
         dict(BLOCK_M=128, E_PAD=128, BLOCK_T=32)),
        (moe_triton._gate_up_kernel, dict(x_ptr=bf16, w_ptr=bf16, h_ptr=bf16, gate_up_ptr=bf16, **rows),
         dict(STORE_GATE_UP=True, DOT_PRECISION="tf32", **TRAINING_TILE)),
        (moe_triton._scatter_matmul_kernel, dict(a_ptr=bf16, w_ptr=bf16, scale_ptr="*fp32", out_ptr=bf16, **rows),
         dict(HAS_SCALE=True, DOT_PRECISION="tf32", **TRAINING_TILE)),
        (moe_triton._swiglu_grad_kernel,
         dict(dy_ptr=bf16, w_ptr=bf16, weights_ptr="*fp32", gate_up_ptr=bf16, d_gate_up_ptr=bf16, h_ptr=bf16,
              d_weight_ptr="*fp32", **rows),
         dict(DOT_PRECISION="tf32", GROUP=moe_triton.GROUP, **TRAINING_TILE)),
    ]
    weight_grad_pointers = dict(a_ptr=bf16, b_ptr=bf16, sorted_pair_ptr="*i32", counts_ptr="*i32", starts_ptr="*i32",
                                scale_ptr="*fp32", out_ptr=bf16)
    for a_by_token, b_by_token, scale in [(False, True, False), (True, False, True)]:
        cases.append((moe_triton._expert_weight_grad_kernel, weight_grad_pointers,
                      dict(A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, HAS_SCALE=scale, DOT_PRECISION="tf32",
                           **TRAINING_TILE)))
    for kernel, pointers, constexprs in cases:
        warps = 8 if "BLOCK_N" in constexprs else 4
        print(json.dumps(compile_kernel(kernel, pointers, constexprs, target, num_warps=warps)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
