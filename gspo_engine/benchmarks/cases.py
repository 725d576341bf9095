"""A benchmark case, how one is run, and the row each implementation gives.

A row is the unit shared by `gspo-engine bench --json`, bench/gpu_check.py's results.json and
the pytest suite's summary:

    kernel               "loss" | "fused-linear" | "moe" | "gated-deltanet" | "e2e"
    case                 shape and dtype, e.g. "sequence B=512 T=2048 bfloat16"
    implementation       "gspo_kernels", "reference", or a peer ("liger-chunked", "transformers-grouped_mm", ...)
    status               "ok" | "error" | "skipped" | "not run"
    median_ms            median wall time of one step (synchronised), or None
    peak_mib             device memory the step allocates above what was allocated before it
                         (GPU only: None on CPU)
    throughput, unit     work per second: "GB/s" (loss), "TFLOP/s" (matmul kernels), "tokens/s" (e2e)
    fraction_of_ceiling  throughput over the card's measured ceiling: copy GB/s for GB/s rows, bf16
                         matmul TFLOP/s for TFLOP/s rows, and MFU (model FLOP/s over the matmul
                         ceiling) for tokens/s rows; None on CPU
    vs_reference         the case's baseline median / this median (above 1: faster than it); the
                         baseline is the "reference" implementation, or for e2e the common way
    note                 why a row was skipped or not run, or the error of a failed one
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from gspo_engine.benchmarks.timing import median_seconds
from gspo_engine.device import synchronize

ROW_FIELDS = ("kernel", "case", "implementation", "status", "median_ms", "peak_mib", "throughput", "unit",
              "fraction_of_ceiling", "vs_reference", "note")
REFERENCE = "reference"


@dataclass
class Case:
    """One shape of one kernel family, run by several implementations on the same inputs.

    builders: implementation -> a function that builds the inputs and returns one step (a
    zero-argument callable); built lazily, one implementation at a time, so that only one set
    of large inputs is alive. skipped: implementation -> why it does not run here. work: the
    amount one step does in `unit`'s numerator (bytes, FLOPs or tokens); flops: the model FLOPs
    of one step, for the MFU of tokens/s rows; baseline: the implementation vs_reference divides by.
    """

    kernel: str
    name: str
    unit: str
    work: float
    builders: dict[str, Callable[[], Callable[[], None]]]
    skipped: dict[str, str] = field(default_factory=dict)
    flops: float | None = None
    max_rounds: int | None = None
    baseline: str = REFERENCE

    @property
    def implementations(self) -> list[str]:
        return list(self.builders) + list(self.skipped)


def empty_row(case: Case, implementation: str, status: str, note: str | None = None) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(kernel=case.kernel, case=case.name, implementation=implementation, status=status, unit=case.unit,
               note=note)
    return row


def measured_row(case: Case, implementation: str, seconds: float, peak_mib: float | None,
                 ceilings: dict[str, float | None]) -> dict:
    row = empty_row(case, implementation, "ok")
    scale = {"GB/s": 1e9, "TFLOP/s": 1e12, "tokens/s": 1.0}[case.unit]
    throughput = case.work / seconds / scale
    if case.unit == "GB/s":
        ceiling, achieved = ceilings.get("copy_gb_per_s"), throughput
    elif case.unit == "TFLOP/s":
        ceiling, achieved = ceilings.get("matmul_tflops"), throughput
    else:
        ceiling = ceilings.get("matmul_tflops")
        achieved = case.flops / seconds / 1e12 if case.flops else None
    row.update(median_ms=seconds * 1e3, peak_mib=peak_mib, throughput=throughput,
               fraction_of_ceiling=achieved / ceiling if ceiling and achieved else None)
    return row


def add_reference_ratios(rows: list[dict], baseline: str) -> list[dict]:
    """vs_reference of every measured row of one case, against the row of its baseline."""
    baseline_ms = next((r["median_ms"] for r in rows if r["implementation"] == baseline), None)
    for row in rows:
        if baseline_ms and row["median_ms"]:
            row["vs_reference"] = baseline_ms / row["median_ms"]
    return rows


def timed_with_peak(step: Callable[[], None], device: torch.device, rounds: int) -> tuple[float, float | None]:
    """Median seconds over `rounds` after one warm-up call, and the peak memory of the timed calls
    above what was allocated after the warm-up (gradients and optimizer state count as inputs)."""
    step()
    synchronize(device)
    if device.type != "cuda":
        return median_seconds(step, device, rounds, warmup=0), None
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    seconds = median_seconds(step, device, rounds, warmup=0)
    return seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**20


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, device: torch.device, rounds: int, ceilings: dict[str, float | None]) -> list[dict]:
    """Every implementation of `case`; a failure becomes an error row.

    On a GPU one implementation after the other, so that only one set of large inputs is alive.
    On a CPU, whose speed drifts with whatever else the machine runs, they take turns call by
    call (A B C A B C ...): a drift then slows every implementation alike, and their ratios hold.
    """
    if device.type != "cuda":
        return run_case_in_turns(case, device, rounds, ceilings)
    rows = []
    effective_rounds = min(rounds, case.max_rounds or rounds)
    for implementation, build in case.builders.items():
        try:
            seconds, peak_mib = timed_with_peak(build(), device, effective_rounds)
            rows.append(measured_row(case, implementation, seconds, peak_mib, ceilings))
        except Exception as error:  # one failing implementation must not stop the others
            traceback.print_exc()
            first_line = (str(error).splitlines() or [""])[0][:200]  # CUDA errors run to many lines
            rows.append(empty_row(case, implementation, "error", f"{type(error).__name__}: {first_line}"))
        release_memory(device)
    rows += [empty_row(case, name, "skipped", why) for name, why in case.skipped.items()]
    return add_reference_ratios(rows, case.baseline)


def run_case_in_turns(case: Case, device: torch.device, rounds: int, ceilings: dict[str, float | None]) -> list[dict]:
    """run_case with every implementation built at once and timed in turns, one call each per round."""
    steps, failed = {}, {}

    def call(implementation: str, step: Callable[[], None]) -> float | None:
        try:
            start = time.perf_counter()
            step()
            synchronize(device)
            return time.perf_counter() - start
        except Exception as error:  # one failing implementation must not stop the others
            traceback.print_exc()
            first_line = (str(error).splitlines() or [""])[0][:200]
            failed[implementation] = f"{type(error).__name__}: {first_line}"
            steps.pop(implementation, None)
            return None

    for implementation, build in case.builders.items():
        try:
            steps[implementation] = build()
        except Exception as error:
            traceback.print_exc()
            failed[implementation] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    for implementation, step in list(steps.items()):  # warm-up
        call(implementation, step)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(min(rounds, case.max_rounds or rounds)):
        for implementation, step in list(steps.items()):
            seconds = call(implementation, step)
            if seconds is not None:
                times[implementation].append(seconds)
    rows = []
    for implementation in case.builders:
        if implementation in failed:
            rows.append(empty_row(case, implementation, "error", failed[implementation]))
        else:
            rows.append(measured_row(case, implementation, statistics.median(times[implementation]), None, ceilings))
    steps.clear()
    release_memory(device)
    rows += [empty_row(case, name, "skipped", why) for name, why in case.skipped.items()]
    return add_reference_ratios(rows, case.baseline)
