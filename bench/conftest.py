"""Shared pieces of the benchmark suite: the device, the cases' parameters, one timed case, the summary.

Every file runs the cases of its family in gspo_engine/benchmarks/ (the same ones `gspo-engine
bench` runs): full shapes on a GPU, small ones on CPU. The summary at the end prints every row
side by side with its throughput and its ratio against the case's baseline.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels only run in the interpreter here; the benchmarks then time the CPU paths.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # On a CPU shared with other jobs, two threads mostly wait on each other (a 256^3 matmul:
    # 16 ms with 2 threads, 1.2 ms with 1) and the ratios swing with the load: time on one.
    torch.set_num_threads(1)

from gspo_engine.benchmarks import markdown_table  # noqa: E402
from gspo_engine.benchmarks.cases import Case, add_reference_ratios, measured_row  # noqa: E402
from gspo_engine.benchmarks.registry import default_scale  # noqa: E402
from gspo_engine.benchmarks.timing import ceilings, peak_extra_mib  # noqa: E402
from gspo_engine.device import synchronize  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALE = default_scale(DEVICE)
DEFAULT_ROUNDS = 20 if DEVICE.type == "cuda" else 10
ROWS: list[dict] = []


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def card_ceilings() -> dict[str, float | None]:
    """The card's copy bandwidth and bf16 matmul ceiling; None on CPU, where absolute figures mean little."""
    return ceilings(DEVICE)


@pytest.fixture(scope="session")
def copy_gb_per_s(card_ceilings) -> float | None:
    return card_ceilings["copy_gb_per_s"]


def case_params(cases: list[Case]) -> list:
    """(case, implementation) pairs, baseline first within a case, so its median is known for the ratios."""
    params = []
    for case in cases:
        for name in case.implementations:
            marks = [pytest.mark.skip(reason=case.skipped[name])] if name in case.skipped else []
            params.append(pytest.param(case, name, id=f"{case.name}-{name}".replace(" ", "-"), marks=marks))
    return params


def run_benchmark(benchmark, device: torch.device, step, rounds: int) -> float | None:
    """Time `step` (synchronised) with pytest-benchmark; return its peak extra device memory in MiB."""
    peak_mib = peak_extra_mib(step, device)

    def synchronized_step():
        step()
        synchronize(device)

    benchmark.pedantic(synchronized_step, rounds=rounds, warmup_rounds=1, iterations=1)
    return peak_mib


def benchmark_case(benchmark, case: Case, implementation: str, ceilings: dict) -> dict | None:
    """Time one implementation of one case; its row goes to extra_info and to the summary.

    On a GPU one call runs first, so that autotuning and the first allocation of gradients and
    optimizer state stay out of the time and the memory reading. None under --benchmark-disable.
    """
    step = case.builders[implementation]()
    if DEVICE.type == "cuda":
        step()
    benchmark.group = f"{case.kernel} {case.name} {DEVICE.type}"
    peak_mib = run_benchmark(benchmark, DEVICE, step, rounds=min(case.max_rounds or DEFAULT_ROUNDS, DEFAULT_ROUNDS))
    if benchmark.stats is None:
        return None
    row = measured_row(case, implementation, benchmark.stats.stats.median, peak_mib, ceilings)
    same_case = [r for r in ROWS if (r["kernel"], r["case"]) == (case.kernel, case.name)]
    add_reference_ratios(same_case + [row], case.baseline)
    ROWS.append(row)
    benchmark.extra_info.update({key: row[key] for key in ("peak_mib", "throughput", "unit", "fraction_of_ceiling",
                                                           "vs_reference")})
    return row


def pytest_terminal_summary(terminalreporter):
    if ROWS:
        terminalreporter.write_sep("=", "side by side (vs reference: the baseline's median / this median)")
        terminalreporter.write_line("\n".join(markdown_table(ROWS)))
