"""Compile every Triton kernel of gspo_kernels for NVIDIA GPUs, on a machine without one.

    python -m gspo_kernels.compile_check [--arch 80,90,100] [--json PATH] [--jobs N] [--match REGEX]

Triton's compiler needs no GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
builds the PTX and the cubin an A100 (sm_80), an H100 / H200 (sm_90) or a B200 (sm_100) would run.
This builds every specialisation the launch code can choose at run time and prints one row per
(kernel, specialisation, architecture): registers per thread, bytes of local memory per thread
(spilled registers), shared memory per block, and OK or what is wrong. It exits 1 when a kernel
does not compile, spills, or needs more shared memory than the architecture gives a block.

Which specialisations: each kernel's constexpr flags and levels, every float dtype the public
functions run on the Triton path (fp32, bf16, fp16; fp64 runs the PyTorch path; the launchers
turn indices, masks and routing weights into one dtype each), and every block size and autotune
config the launchers can pick on each architecture, read from the tables the launchers use
(`moe_triton.GEMM_TILES`, `loss_triton.token_blocks`, `fused_linear_triton.STATS_BLOCK_V`, ...), so a
config added there is checked here. Scalar arguments take their values at Qwen3 shapes (dimensions and row
strides multiples of 16, unit strides of contiguous rows) and pointers are 16-byte aligned, which
is what Triton's JIT infers from a real launch. A module-level `@triton.jit` function that no
other kernel calls is a kernel: one without cases here is reported and fails the check.

It proves that a kernel builds and fits on the card, not that it computes the right thing: that is
for the interpreter tests, the PyTorch path and the GPU run. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib
import itertools
import json
import multiprocessing
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings

import torch

from gspo_kernels.dot_triton import dot_precision

# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin; CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability"): what Triton's launcher checks a
# kernel's shared memory against before it runs.
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
CARDS = {80: "A100", 90: "H100 / H200", 100: "B200"}
DEFAULT_ARCHS = (80, 90, 100)
# The float dtypes the public functions run through the Triton kernels.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_TRITON_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.int64: "i64",
    torch.uint8: "u8",
}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """One compile of `kernel`: its argument values at a launch, its constexprs and launch options.

    args maps each runtime argument to its value at a representative launch: a torch.dtype stands
    for a tensor of that dtype, an int or a float for a scalar.
    """

    kernel: object
    label: str
    args: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple | None = None  # the archs whose launchers can pick it; None: every arch

    @property
    def name(self) -> str:
        return _jit_function(self.kernel).__name__


@dataclasses.dataclass
class Row:
    kernel: str
    specialisation: str
    arch: int
    registers: int | None = None
    spill_bytes: int | None = None  # local memory per thread: registers spilled to the stack
    shared_bytes: int | None = None
    pipelined: bool | None = None  # loads copied to shared memory asynchronously, stages ahead
    wgmma: bool | None = None  # dots on Hopper's warp-group MMA
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _jit_function(kernel):
    """The JITFunction under autotune / heuristics wrappers."""
    import triton

    while not isinstance(kernel, triton.runtime.JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT_NAMES[dtype]


def describe(constexprs: dict, **extra) -> str:
    """A specialisation's label: its constexprs, then launch options."""
    parts = [f"{key}={value}" for key, value in {**constexprs, **extra}.items()]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# The specialisations, per kernel module


def loss_specialisations() -> list[Specialisation]:
    from gspo_kernels import loss_stats, loss_triton

    specs = []
    fixed = dict(POLICY_MAX=loss_stats.POLICY_LOG_RATIO_MAX, KL_MAX=loss_stats.KL_LOG_RATIO_MAX,
                 NUM_STATS=loss_stats.NUM_STATS)
    length = 2048
    # (KL term, KL weighted by the ratio): the launchers weight only a KL that is there
    kl_flags = ((False, False), (True, False), (True, True))
    # gspo_loss takes per-token advantages at the levels "sequence_token" and "token" only
    advantages = [(level, token_adv) for level in loss_triton.LEVEL_CODES
                  for token_adv in ((False,) if level == "sequence" else (False, True))]
    for dtype, (level, token_adv), (has_kl, kl_weighted) in itertools.product(FLOAT_DTYPES, advantages, kl_flags):
        tokens = dict(logps_ptr=dtype, old_ptr=dtype, adv_ptr=dtype, mask_ptr=torch.uint8, ref_ptr=dtype,
                      stats_ptr=torch.float32, T=length, stride_logps=length, stride_old=length,
                      stride_adv=length if token_adv else 0, stride_mask=length, stride_ref=length, eps_low=3e-4,
                      eps_high=4e-4, beta=0.04)
        flags = dict(LEVEL=loss_triton.LEVEL_CODES[level], TOKEN_ADV=token_adv)
        for block in loss_triton.token_blocks(loss_triton.FORWARD_BLOCK_T):
            constexprs = dict(flags, HAS_REF=has_kl, KL_WEIGHTED=kl_weighted, BLOCK_T=block)
            specs.append(Specialisation(loss_triton._gspo_forward_kernel,
                                        f"{dtype_name(dtype)} {level} {describe(constexprs)}", tokens,
                                        dict(constexprs, **fixed)))
        backward = dict(tokens, grad_loss_ptr=torch.float32, num_averaged_ptr=torch.float32, grad_ptr=dtype,
                        stride_grad=length)
        for block in loss_triton.token_blocks(loss_triton.BACKWARD_BLOCK_T):
            constexprs = dict(flags, HAS_KL=has_kl, KL_WEIGHTED=kl_weighted, BLOCK_T=block)
            specs.append(Specialisation(loss_triton._gspo_backward_kernel,
                                        f"{dtype_name(dtype)} {level} {describe(constexprs)}", backward,
                                        dict(constexprs, **fixed)))
    reduce_args = dict(stats_ptr=torch.float32, loss_ptr=torch.float32, metrics_ptr=torch.float32,
                       num_averaged_ptr=torch.float32, B=512)
    for level, count_empty in itertools.product(loss_triton.LEVEL_CODES, (False, True)):
        constexprs = dict(LEVEL=loss_triton.LEVEL_CODES[level], COUNT_EMPTY=count_empty,
                          NUM_STATS=loss_stats.NUM_STATS, BLOCK_B=loss_triton.REDUCE_BLOCK_B)
        specs.append(Specialisation(loss_triton._gspo_reduce_kernel, f"fp32 {level} {describe(constexprs)}",
                                    reduce_args, constexprs))
    return specs


def fused_linear_specialisations() -> list[Specialisation]:
    from gspo_kernels import fused_linear_triton as flt

    specs = []
    width = 8192  # the vocabulary chunk of a streamed tile on a GPU (gspo_kernels.stream_tile)
    options = {"num_warps": flt.NUM_WARPS}
    common = dict(logits_ptr=torch.float32, targets_ptr=torch.int64, width=width, vocab_start=width,
                  stride_lm=width, inv_temperature=1.0)

    def bias_text(bias):
        return f"bias {dtype_name(bias)} " if bias is not None else ""

    # The logits tile is fp32 (cuBLAS's fp32 result) whatever the operands, so the statistics kernel
    # varies only with the bias, which is in the operands' dtype or in fp32.
    for bias, with_entropy in itertools.product((None, *FLOAT_DTYPES), (False, True)):
        constexprs = dict(HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, BLOCK_V=flt.STATS_BLOCK_V)
        specs.append(Specialisation(
            flt._tile_stats_kernel, f"{bias_text(bias)}{describe(constexprs, **options)}",
            dict(common, bias_ptr=bias or torch.float32, max_ptr=torch.float32, sum_exp_ptr=torch.float32,
                 sum_exp_z_ptr=torch.float32, target_logit_ptr=torch.float32), constexprs, **options,
        ))
    # d logits are written in the operands' dtype
    biases = [(dtype, bias) for dtype in FLOAT_DTYPES for bias in dict.fromkeys((None, dtype, torch.float32))]
    for (dtype, bias), with_entropy in itertools.product(biases, (False, True)):
        constexprs = dict(HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, BLOCK_V=flt.DLOGITS_BLOCK_V)
        specs.append(Specialisation(
            flt._tile_dlogits_kernel, f"{dtype_name(dtype)} {bias_text(bias)}{describe(constexprs, **options)}",
            dict(common, bias_ptr=bias or torch.float32, lse_ptr=torch.float32, entropy_ptr=torch.float32,
                 grad_logp_ptr=torch.float32, grad_entropy_ptr=torch.float32, out_ptr=dtype, stride_om=width),
            constexprs, **options,
        ))
    return specs


# (E, k) of the MoE models the engine trains: Qwen3-30B-A3B and Qwen3-235B-A22B, the embedded tiny-moe.
ROUTING_SHAPES = ((128, 8), (8, 2))
# Qwen3-30B-A3B's experts at 4096 tokens: hidden H, intermediate I.
MOE_TOKENS, MOE_HIDDEN, MOE_INTER = 4096, 2048, 768


def moe_specialisations() -> list[Specialisation]:
    from gspo_kernels import moe_triton as mt

    specs = []
    for (experts, top_k), dtype, normalize, forced in itertools.product(
        ROUTING_SHAPES, FLOAT_DTYPES, (True, False), (False, True)
    ):
        constexprs = dict(mt.route_blocks(experts, top_k), NORMALIZE=normalize, FORCED=forced)
        specs.append(Specialisation(
            mt._route_topk_kernel, f"{dtype_name(dtype)} E={experts} {describe(constexprs)}",
            dict(logits_ptr=dtype, weights_ptr=torch.float32, idx_ptr=torch.int64, forced_ptr=torch.int64,
                 N=MOE_TOKENS, E=experts, stride_ln=experts), constexprs,
        ))
    for experts, _ in ROUTING_SHAPES:
        pairs = MOE_TOKENS * 8
        blocks = dict(BLOCK_P=mt.PAIR_BLOCK, E_PAD=mt.experts_pad(experts))
        specs.append(Specialisation(
            mt._count_experts_kernel, f"E={experts} {describe(blocks)}",
            dict(idx_ptr=torch.int64, block_counts_ptr=torch.int32, S=pairs, E=experts), blocks,
        ))
        specs.append(Specialisation(
            mt._place_pairs_kernel, f"E={experts} BLOCK_P={mt.PAIR_BLOCK}",
            dict(idx_ptr=torch.int64, block_base_ptr=torch.int32, sorted_pair_ptr=torch.int32, S=pairs, E=experts),
            dict(BLOCK_P=mt.PAIR_BLOCK),
        ))
        for block_m in mt.BLOCK_ROWS:
            constexprs = dict(BLOCK_M=block_m, **mt.tile_table_blocks(experts))
            specs.append(Specialisation(
                mt._tile_table_kernel, f"E={experts} {describe(constexprs)}",
                dict(counts_ptr=torch.int32, starts_ptr=torch.int32, tiles_ptr=torch.int32, T=pairs // block_m + 7,
                     E=experts), constexprs,
            ))
    specs += _moe_gemm_specialisations(mt)
    return specs


def _moe_gemm_specialisations(mt) -> list[Specialisation]:
    experts, top_k, hidden, inter = 128, 8, MOE_HIDDEN, MOE_INTER
    pairs = MOE_TOKENS * top_k
    tile_args = dict(sorted_pair_ptr=torch.int32, tiles_ptr=torch.int32, E=experts, T=pairs // 64 + experts,
                     N_BUCKET=MOE_TOKENS)
    specs = []
    for dtype in FLOAT_DTYPES:
        precision = dot_precision(dtype)
        gate_up = dict(tile_args, x_ptr=dtype, w_ptr=dtype, h_ptr=dtype, gate_up_ptr=dtype, H=hidden, I=inter,
                       TOP_K=top_k, stride_xn=hidden, stride_xh=1, stride_we=2 * inter * hidden, stride_wo=hidden,
                       stride_wh=1)
        scatter = dict(tile_args, a_ptr=dtype, w_ptr=dtype, scale_ptr=torch.float32, out_ptr=dtype, H=hidden,
                       I=inter, K=inter, stride_as=inter, stride_ak=1, stride_we=hidden * inter, stride_wk=1,
                       stride_wh=inter)
        swiglu = dict(tile_args, dy_ptr=dtype, w_ptr=dtype, weights_ptr=torch.float32, gate_up_ptr=dtype,
                      d_gate_up_ptr=dtype, h_ptr=dtype, d_weight_ptr=torch.float32, H=hidden, I=inter, TOP_K=top_k,
                      N_GROUPS=inter // mt.GROUP, stride_dyn=hidden, stride_dyh=1, stride_we=hidden * inter,
                      stride_wh=inter, stride_wi=1)
        weight_grad = dict(a_ptr=dtype, b_ptr=dtype, sorted_pair_ptr=torch.int32, counts_ptr=torch.int32,
                           starts_ptr=torch.int32, scale_ptr=torch.float32, out_ptr=dtype, E=experts, TOP_K=top_k,
                           N_BUCKET=MOE_TOKENS)
        # (kernel, arguments, flags): the launches of experts_forward and experts_backward
        launches = [(mt._gate_up_kernel, gate_up, dict(STORE_GATE_UP=store)) for store in (True, False)]
        launches += [(mt._scatter_matmul_kernel, scatter, dict(HAS_SCALE=scale)) for scale in (True, False)]
        launches += [(mt._swiglu_grad_kernel, swiglu, dict(GROUP=mt.GROUP))]
        # d w_gate_up [E, 2I, H] from d gate_up rows and x by token; d w_down [E, H, I] from dy by token
        # (scaled) and h.
        launches += [
            (mt._expert_weight_grad_kernel,
             dict(weight_grad, M=2 * inter, N=hidden, stride_as=2 * inter, stride_am=1, stride_bs=hidden,
                  stride_bn=1, stride_oe=2 * inter * hidden, stride_om=hidden, stride_on=1),
             dict(A_BY_TOKEN=False, B_BY_TOKEN=True, HAS_SCALE=False)),
            (mt._expert_weight_grad_kernel,
             dict(weight_grad, M=hidden, N=inter, stride_as=hidden, stride_am=1, stride_bs=inter, stride_bn=1,
                  stride_oe=hidden * inter, stride_om=inter, stride_on=1),
             dict(A_BY_TOKEN=True, B_BY_TOKEN=False, HAS_SCALE=True)),
        ]
        for kernel, args, flags in launches:
            name = _jit_function(kernel).__name__
            for (size, block_m), tiles in mt.GEMM_TILES[name].items():
                if size != dtype.itemsize:
                    continue
                rows = {} if block_m is None else {"BLOCK_M": block_m}
                for tile in tiles:
                    constexprs = dict(flags, DOT_PRECISION=precision, **rows, **dict(tile.blocks))
                    options = dict(num_warps=tile.num_warps, num_stages=tile.num_stages)
                    label = f"{dtype_name(dtype)} {describe(constexprs, **options)}"
                    specs.append(Specialisation(kernel, label, args, constexprs, archs=tile.archs, **options))
    return specs


SPECIALISATION_SOURCES = (loss_specialisations, fused_linear_specialisations, moe_specialisations)


@functools.cache
def all_specialisations() -> tuple[Specialisation, ...]:
    return tuple(spec for source in SPECIALISATION_SOURCES for spec in source())


# ---------------------------------------------------------------------------------------------
# Finding the kernels


def kernels_in_package() -> dict[str, object]:
    """name -> kernel: every module-level @triton.jit function of gspo_kernels that no other calls."""
    import triton

    package = importlib.import_module("gspo_kernels")
    found = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"gspo_kernels.{module_info.name}")
        for value in vars(module).values():
            fn = _jit_function(value)
            if isinstance(fn, triton.runtime.JITFunction) and fn.fn.__module__ == module.__name__:
                found[fn.__name__] = fn
    called = {name for name in found for other in found.values()
              if other.__name__ != name and re.search(rf"\b{name}\(", other.src)}
    return {name: fn for name, fn in found.items() if name not in called}


# ---------------------------------------------------------------------------------------------
# Compiling


def _signature(spec: Specialisation):
    """(signature, constexprs, attrs) for ASTSource, as the JIT infers them from the launch's values."""
    fn = _jit_function(spec.kernel)
    signature, constexprs, attrs = {}, dict(spec.constexprs), {}
    for index, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
            continue
        if name not in spec.args:
            raise KeyError(f"the specialisation gives no value for argument {name!r}")
        value = spec.args[name]
        if isinstance(value, torch.dtype):
            signature[name] = "*" + _TRITON_TYPES[value]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the JIT turns an integer argument equal to 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name!r}: cannot stand for a {type(value).__name__}")
    unknown = set(spec.args) - set(fn.arg_names)
    if unknown:
        raise KeyError(f"the kernel has no argument {sorted(unknown)}")
    return signature, constexprs, attrs


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread) of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK: {text[-300:]}")
    return int(match.group(1)), int(match.group(2))


def compile_row(spec: Specialisation, arch: int) -> Row:
    """Compile `spec` for sm_`arch` and judge the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(spec.name, spec.label, arch)
    try:
        signature, constexprs, attrs = _signature(spec)
        compiled = triton.compile(
            ASTSource(_jit_function(spec.kernel), signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        row.registers, row.spill_bytes = _resource_usage(compiled.asm["cubin"])
        row.shared_bytes = compiled.metadata.shared
        ttgir = compiled.asm["ttgir"]
        row.pipelined = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir
        row.wgmma = "warp_group_dot" in ttgir
    except Exception as error:  # noqa: BLE001 - every failure is a row of the report
        row.error = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        return row
    problems = []
    if row.spill_bytes:
        problems.append(f"spills: {row.spill_bytes} bytes of local memory per thread")
    if row.shared_bytes > SHARED_LIMIT_BYTES[arch]:
        problems.append(f"shared memory {row.shared_bytes / 1024:.0f} KiB > {SHARED_LIMIT_BYTES[arch] // 1024} KiB")
    row.error = "; ".join(problems) or None
    return row


def _compile_task(task: tuple[int, int]) -> Row:
    index, arch = task
    return compile_row(all_specialisations()[index], arch)


def missing_kernels(specs) -> list[Row]:
    """A failed row for every kernel of the package that has no specialisation to check."""
    checked = {spec.name for spec in specs}
    return [Row(name, "-", 0, error="no specialisation listed in gspo_kernels/compile_check.py")
            for name in sorted(kernels_in_package()) if name not in checked]


def run(archs, specs, jobs: int, report=print) -> list[Row]:
    """Compile every spec for every arch (in `jobs` processes), reporting each row as it comes."""
    index = {id(spec): i for i, spec in enumerate(all_specialisations())}
    tasks = [(index[id(spec)], arch) for spec in specs for arch in archs if spec.archs is None or arch in spec.archs]
    rows = []
    if jobs > 1:
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            for row in pool.map(_compile_task, tasks):
                report(format_row(row))
                rows.append(row)
    else:
        for task in tasks:
            rows.append(_compile_task(task))
            report(format_row(rows[-1]))
    return rows


# ---------------------------------------------------------------------------------------------
# Report


HEADER = f"{'kernel':<30} {'arch':<6} {'regs':>4} {'spill B':>7} {'shared KiB':>10}  {'result':<6} specialisation"


def format_row(row: Row) -> str:
    arch = f"sm_{row.arch}" if row.arch else "-"
    regs = "-" if row.registers is None else str(row.registers)
    spill = "-" if row.spill_bytes is None else str(row.spill_bytes)
    shared = "-" if row.shared_bytes is None else f"{row.shared_bytes / 1024:.1f}"
    result = "OK" if row.ok else f"FAIL ({row.error})"
    return f"{row.kernel:<30} {arch:<6} {regs:>4} {spill:>7} {shared:>10}  {result:<6} {row.specialisation}"


def summary(rows: list[Row], archs) -> str:
    failed = [row for row in rows if not row.ok]
    kernels = len({row.kernel for row in rows})
    per_arch = ", ".join(f"sm_{arch} ({CARDS[arch]}) {sum(row.arch == arch for row in rows)}" for arch in archs)
    verdict = "passed" if not failed else f"FAILED: {len(failed)} rows"
    return f"{len(rows)} rows, {kernels} kernels; specialisations per arch: {per_arch}; {verdict}"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m gspo_kernels.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                        type=lambda text: [int(arch) for arch in text.split(",")],
                        help=f"Comma-separated compute capabilities (default {','.join(map(str, DEFAULT_ARCHS))}).")
    parser.add_argument("--json", type=pathlib.Path, help="Also write the rows to this file as JSON.")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Compiles run in this many processes.")
    parser.add_argument("--match", metavar="REGEX",
                        help="Only the specialisations whose row ('KERNEL LABEL') REGEX finds (re.search); the "
                             "check that every kernel has specialisations is then skipped.")
    args = parser.parse_args(argv)
    unknown = [arch for arch in args.arch if arch not in SHARED_LIMIT_BYTES]
    if unknown:
        parser.error(f"no shared-memory limit known for sm_{unknown[0]}; choose from {sorted(SHARED_LIMIT_BYTES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Triton 3.9 warns once per process that its default for fusing multiplies and adds will change;
    # the check compiles with the default the JIT uses, so the warning says nothing about the rows.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check compiles for real GPUs: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    specs = [spec for spec in all_specialisations() if not args.match or re.search(args.match, f"{spec.name} {spec.label}")]
    print(HEADER, flush=True)
    rows = [] if args.match else missing_kernels(all_specialisations())
    for row in rows:
        print(format_row(row), flush=True)
    rows += run(args.arch, specs, max(1, args.jobs), report=lambda line: print(line, flush=True))
    print(summary(rows, args.arch), flush=True)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(row) for row in rows], indent=1) + "\n")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
