"""Driver of bench/gpu_check.sh: environment, kernel tests, benchmarks, and a markdown table.

Every stage runs in its own subprocess with a time limit, so one failure or hang still leaves
the others' results. The table (gpu_check.md) is what goes into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

KERNEL_TESTS = ["tests/test_gspo_loss.py", "tests/test_fused_linear.py", "tests/test_moe_kernels.py"]


def environment() -> list[str]:
    import torch

    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines.append(f"commit: {commit or 'unknown'}")
    lines.append(f"torch: {torch.__version__}")
    try:
        import triton

        lines.append(f"triton: {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"card: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    else:
        lines.append("card: none (CPU run)")
    return lines


def stage(name: str, command: list[str], timeout_s: int, log: pathlib.Path) -> bool:
    print(f"\n== {name}: {' '.join(command)}", flush=True)
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        output, ok = result.stdout, result.returncode == 0
    except subprocess.TimeoutExpired as error:
        output, ok = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or ""), False
        output += f"\n{name}: timed out after {timeout_s} s\n"
    log.write_text(output)
    print("\n".join(output.splitlines()[-15:]), flush=True)
    print(f"== {name}: {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def benchmark_table(report: pathlib.Path) -> list[str]:
    if not report.exists():
        return ["(no benchmark report)"]
    benchmarks = json.loads(report.read_text())["benchmarks"]
    rows = ["| group | case | median ms | extra |", "| --- | --- | --- | --- |"]
    for bench in sorted(benchmarks, key=lambda b: (b["group"] or "", b["name"])):
        extra = ", ".join(f"{k}={v}" for k, v in bench.get("extra_info", {}).items())
        rows.append(f"| {bench['group']} | {bench['name']} | {bench['stats']['median'] * 1e3:.3f} | {extra} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tests-timeout-s", type=int, default=180)
    parser.add_argument("--bench-timeout-s", type=int, default=300)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    env = environment()
    print("\n".join(env), flush=True)
    tests = [path for path in KERNEL_TESTS if pathlib.Path(path).exists()]
    tests_ok = stage("kernel tests", [sys.executable, "-m", "pytest", "-q", "-x", *tests], args.tests_timeout_s, out / "tests.log")
    report = out / "bench.json"
    bench_ok = stage(
        "benchmarks",
        [sys.executable, "-m", "pytest", "bench", "-q", f"--benchmark-json={report}", "--benchmark-group-by=group"],
        args.bench_timeout_s,
        out / "bench.log",
    )
    table = ["### GPU check", "", *[f"- {line}" for line in env],
             f"- kernel tests: {'passed' if tests_ok else 'FAILED (see tests.log)'}",
             f"- benchmarks: {'ran' if bench_ok else 'FAILED (see bench.log)'}", "", *benchmark_table(report)]
    (out / "gpu_check.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    return 0 if tests_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
