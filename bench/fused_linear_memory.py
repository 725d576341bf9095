"""lm_head + GSPO loss on CPU, side by side: peak RSS above inputs and gradients, and time.

Each implementation runs one forward + backward in a fresh subprocess, so that no allocator
cache or earlier peak leaks between them; the parent prints a markdown table.

    PYTHONPATH=. python bench/fused_linear_memory.py                      # B=4 T=512 H=512 V=151936 fp32
    PYTHONPATH=. python bench/fused_linear_memory.py --repeats 3 --impls reference,fused

Implementations and inputs: gspo_engine/benchmarks/fused_linear.py (shared with `gspo-engine bench`);
peers are skipped when not installed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from gspo_engine.benchmarks.fused_linear import IMPLEMENTATIONS, available, make_inputs, make_step


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Return to the system what the C allocator kept of freed memory (glibc's malloc_trim), so that
    the baseline holds live memory only and a step cannot hide its own needs in pages the setup freed."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def measure_in_this_process(name: str, batch: int, steps: int, hidden_size: int, vocab: int) -> dict:
    # a tiny run first: thread pools and lazy imports are not what is measured
    make_step(name, make_inputs(2, 8, 16, 64))()
    inputs = make_inputs(batch, steps, hidden_size, vocab)
    step = make_step(name, inputs)
    release_freed_memory()
    base = resident_bytes()
    grad_bytes = sum(inputs[k].numel() * inputs[k].element_size() for k in ("hidden", "weight"))
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    step()
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(impl=name, extra_mib=(peak - base - grad_bytes) / 2**20, seconds=seconds, cpu_seconds=cpu_seconds)


def _cpu_seconds() -> float:
    """CPU time of this process: less sensitive than wall time to other jobs sharing the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_in_subprocess(name: str, shape: tuple[int, int, int, int]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--shape", *map(str, shape)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def side_by_side(shape, impls, repeats: int) -> dict[str, dict]:
    """Per implementation: the largest extra memory, the median time, and each run's memory and time."""
    runs = {name: [] for name in impls}
    for _ in range(repeats):
        for name in impls:  # interleaved, so that load from other processes hits every one alike
            runs[name].append(measure_in_subprocess(name, shape))
    return {
        name: dict(
            extra_mib=max(r["extra_mib"] for r in rs),
            all_extra_mib=[round(r["extra_mib"]) for r in rs],
            seconds=statistics.median(r["seconds"] for r in rs),
            cpu_seconds=statistics.median(r["cpu_seconds"] for r in rs),
            all_seconds=[round(r["seconds"], 1) for r in rs],
        )
        for name, rs in runs.items()
    }


def table(results: dict[str, dict]) -> list[str]:
    ref = results.get("reference")
    lines = ["| implementation | extra peak RSS (MiB) | memory / reference | every run, extra (MiB) "
             "| median wall time (s) | wall / reference | every run, wall (s) | median CPU time (s) | CPU / reference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        mem_ratio = f"{r['extra_mib'] / ref['extra_mib']:.3f}" if ref else "-"
        time_ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        cpu_ratio = f"{r['cpu_seconds'] / ref['cpu_seconds']:.2f}" if ref else "-"
        runs, extras = ", ".join(map(str, r["all_seconds"])), ", ".join(map(str, r["all_extra_mib"]))
        lines.append(f"| {name} | {r['extra_mib']:.0f} | {mem_ratio} | {extras} | {r['seconds']:.2f} | {time_ratio} "
                     f"| {runs} | {r['cpu_seconds']:.1f} | {cpu_ratio} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=4, type=int, default=[4, 512, 512, 151936], metavar=("B", "T", "H", "V"))
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_in_this_process(args.child, *args.shape)))
        return 0
    impls = [name for name in args.impls.split(",") if available(name)]
    results = side_by_side(tuple(args.shape), impls, args.repeats)
    batch, steps, hidden_size, vocab = args.shape
    print(f"B={batch} T={steps} H={hidden_size} V={vocab} fp32, CPU, {torch.get_num_threads()} threads, "
          f"{args.repeats} fresh run(s) each")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
