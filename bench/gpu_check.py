"""Driver of bench/gpu_check.sh: environment, ceilings, the compile check, kernel tests on CUDA, every benchmark
family, one table.

Each stage runs in a subprocess with a time limit drawn from one overall budget, so that a
failure or a hang still leaves the other stages' results and the whole check ends in time. On a
machine without a GPU nothing is measured: every GPU row is written as "not run" and it exits 0.

results.json (schema_version 3):
    schema_version  3
    date            "YYYY-MM-DD HH:MM UTC"
    commit          short hash of HEAD, or "unknown"
    command         the command line that produced it
    environment     {"card", "driver", "torch", "triton", "transformers", "liger_kernel", "python"}:
                    version strings, None where absent (card and driver: None without a GPU)
    ceilings        {"copy_gb_per_s", "matmul_tflops"}: measured on the card, None without a GPU
    compile_check   {"status": "passed" | "failed" | "not run", "command", "seconds", "summary"}:
                    `python -m gspo_kernels.compile_check --arch ARCH` for the card's compute capability,
                    before the tests, so a kernel that does not build or fit on it is told apart from one
                    that computes wrong; its summary is the check's last line
    tests           the same keys for the kernel tests on CUDA
    training        the same keys for `gspo-engine train configs/tiny-moe.yaml` on the GPU (bf16-mixed);
                    its summary is the run's last console lines (the "done:" line when it finished)
    rows            one row per (family, case, implementation): the fields of
                    gspo_engine.benchmarks.cases.ROW_FIELDS, documented there
    seconds         wall time of the whole check
gpu_check.md holds the same as markdown: the environment, then one table of the rows.
results.json and gpu_check.md are rewritten after every stage, so a check cut short still leaves what it
measured. Each stage's output goes to logs/<stage>.log; at the end the logs become one logs.tar.gz.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import pathlib
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

from gspo_engine.benchmarks import FAMILIES, ROW_FIELDS, markdown_table
from gspo_engine.benchmarks.cases import empty_row
from gspo_engine.benchmarks.timing import ceilings

SCHEMA_VERSION = 3
TEST_WORKERS = 8
KERNEL_TESTS = ["tests/test_gspo_loss.py", "tests/test_fused_linear.py", "tests/test_moe_kernels.py",
                "tests/test_distributed.py::test_fsdp_trains_on_cuda_with_bf16_compute",
                "tests/test_decoding.py::test_cuda_graph_decoding_matches_eager_and_never_waits_for_the_device",
                "tests/test_decoding.py::test_the_one_pass_keyed_sampling_kernel_draws_what_sample_next_draws",
                "tests/test_decoding.py::test_a_step_that_cannot_be_captured_runs_eagerly_unless_graphs_are_required",
                # flash-linear-attention (fla-core, carried as a wheel) against our PyTorch path and transformers
                "tests/test_qwen3_next_cuda.py",
                # packed micro-batches' attention: compiled FlexAttention (and flash-attn varlen where installed)
                "tests/test_packing_cuda.py",
                # the trainer's AdamW, fused on CUDA, against the foreach one
                "tests/test_optim.py",
                # fp32 products of bf16 operands (the lm_head's tiles and gradient sums)
                "tests/test_wide_matmul.py"]
TOP_KEYS = ("schema_version", "date", "commit", "command", "environment", "ceilings", "compile_check", "tests",
            "training", "rows", "seconds")
TRAIN_CONFIG = "configs/tiny-moe.yaml"
ENVIRONMENT_KEYS = ("card", "driver", "torch", "triton", "transformers", "liger_kernel", "python")
TEST_STATUSES = ("passed", "failed", "not run")
ROW_STATUSES = ("ok", "error", "skipped", "not run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out", help="Folder for results.json, gpu_check.md and the logs.")
    parser.add_argument("--families", default=",".join(FAMILIES), type=lambda text: text.split(","),
                        help=f"Comma-separated benchmark families (default: {','.join(FAMILIES)}).")
    parser.add_argument("--rounds", type=int, default=10, help="Timed calls per case, at most.")
    parser.add_argument("--budget-s", type=float, default=540, help="Time for the whole check; stages share it.")
    parser.add_argument("--compile-timeout-s", type=float, default=120,
                        help="At most this much for compiling every kernel for the card (gspo_kernels.compile_check).")
    parser.add_argument("--tests-timeout-s", type=float, default=240, help="At most this much for the kernel tests.")
    parser.add_argument("--train-timeout-s", type=float, default=150,
                        help=f"At most this much for training {TRAIN_CONFIG} on the GPU.")
    parser.add_argument("--skip-tests", action="store_true", help="Only the benchmarks.")
    parser.add_argument("--skip-compile-check", action="store_true",
                        help="No ahead-of-time compile of every kernel (the kernel tests still build what they run).")
    args = parser.parse_args(argv)
    unknown = [name for name in args.families if name not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    return args


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command_output(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def environment() -> dict[str, str | None]:
    card = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        card = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    return {
        "card": card,
        "driver": card and _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "python": platform.python_version(),
    }


def _text(output: bytes | str | None) -> str:
    """What a timed-out subprocess had printed: bytes, whatever `text=True` asked for."""
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def run_stage(name: str, command: list[str], timeout_s: float, log: pathlib.Path) -> tuple[str, str, float]:
    """Run `command`, its output to `log`; ("ok" | "failed" | "timed out", stdout, seconds)."""
    print(f"\n== {name}: {shlex.join(command)} (at most {timeout_s:.0f} s)", flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout_s, 1), check=False)
        status, stdout, stderr = "ok" if result.returncode == 0 else "failed", result.stdout, result.stderr
    except subprocess.TimeoutExpired as error:
        status, stdout, stderr = "timed out", _text(error.stdout), _text(error.stderr)
    seconds = time.perf_counter() - start
    log.write_text(stdout + ("\n--- stderr ---\n" + stderr if stderr else ""))
    print("\n".join((stderr or stdout).splitlines()[-12:]), flush=True)
    print(f"== {name}: {status} after {seconds:.0f} s", flush=True)
    return status, stdout, seconds


def card_arch() -> int | None:
    """The card's compute capability as compile_check names it (90 for an H100), None without a GPU."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return 10 * major + minor


def compile_check(out: pathlib.Path, timeout_s: float) -> dict:
    """Every kernel specialisation compiled for this card's architecture, as CI does without a GPU."""
    from gspo_kernels.compile_check import SHARED_LIMIT_BYTES

    arch = card_arch()
    command = [sys.executable, "-m", "gspo_kernels.compile_check", "--arch", str(arch), "--json",
               str(out / "logs" / "compile_check.json")]
    if arch is None:
        return {"status": "not run", "command": None, "seconds": None, "summary": "no GPU"}
    if arch not in SHARED_LIMIT_BYTES:
        return {"status": "not run", "command": shlex.join(command), "seconds": None,
                "summary": f"sm_{arch} is not an architecture compile_check knows ({sorted(SHARED_LIMIT_BYTES)})"}
    status, output, seconds = run_stage(f"compile check for sm_{arch}", command, timeout_s,
                                        out / "logs" / "compile_check.log")
    summary = output.strip().splitlines()[-1] if output.strip() else "no output"
    if status == "timed out":
        summary = f"timed out after {timeout_s:.0f} s; {summary}"
    return {"status": "passed" if status == "ok" else "failed", "command": shlex.join(command), "seconds": seconds,
            "summary": summary}


def failed_tests(pytest_output: str) -> list[str]:
    """The node ids of pytest's short summary (-rfE): its FAILED and ERROR lines."""
    return [line.split()[1] for line in pytest_output.splitlines()
            if line.startswith(("FAILED ", "ERROR ")) and len(line.split()) > 1]


def kernel_tests(out: pathlib.Path, timeout_s: float) -> dict:
    tests = [path for path in KERNEL_TESTS if pathlib.Path(path.split("::")[0]).exists()]
    # -rfE --tb=line: one line per failure and its name in the summary; --durations: where the time went
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=line", "--durations=15",
               *tests]
    if importlib.util.find_spec("xdist") is not None:
        # some 235 tests, most of them compiling Triton kernels: compilation is CPU work, spread it
        command += ["-n", str(TEST_WORKERS)]
    if not torch.cuda.is_available():
        return {"status": "not run", "command": shlex.join(command), "seconds": None, "summary": "no GPU"}
    status, output, seconds = run_stage("kernel tests on CUDA", command, timeout_s, out / "logs" / "tests.log")
    summary = output.strip().splitlines()[-1] if output.strip() else "no output"
    failed = failed_tests(output)
    if failed:
        summary += "; failed: " + ", ".join(failed)
    if status == "timed out":
        summary = f"timed out after {timeout_s:.0f} s; {summary}"
    return {"status": "passed" if status == "ok" else "failed", "command": shlex.join(command), "seconds": seconds,
            "summary": summary}


def tiny_training(out: pathlib.Path, timeout_s: float) -> dict:
    """The embedded default trained on the GPU: the whole engine (rollout, fused loss, MoE kernels,
    bf16-mixed) end to end. Its metrics are written per step, so a run cut by the time limit still
    tells how far it got."""
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="gspo-tiny-"))
    command = [sys.executable, "-m", "gspo_engine", "train", TRAIN_CONFIG, "--output_dir", str(run_dir / "run"),
               "--set", "train.cpu_threads=0"]
    if not torch.cuda.is_available():
        return {"status": "not run", "command": shlex.join(command), "seconds": None, "summary": "no GPU"}
    status, output, seconds = run_stage(f"training {TRAIN_CONFIG} on CUDA", command, timeout_s, out / "logs" / "train.log")
    metrics = run_dir / "run" / "metrics.jsonl"
    steps = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    done = [line for line in output.splitlines() if line.startswith("done:")]
    summary = done[-1] if done else f"{status} after {seconds:.0f} s at step {steps}"
    return {"status": "passed" if status == "ok" else "failed", "command": shlex.join(command), "seconds": seconds,
            "summary": summary}


def not_run_rows(family: str, note: str) -> list[dict]:
    """The GPU cases of `family`, every implementation marked "not run" (nothing is built or measured)."""
    return [empty_row(case, name, "not run", note)
            for case in FAMILIES[family](torch.device("cuda"), "gpu") for name in case.implementations]


def json_rows(output: str) -> list[dict]:
    """The rows `gspo-engine bench --json` printed, one JSON object a line, between whatever else was printed."""
    rows = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a timeout, or a library's own output
    return rows


def family_rows(family: str, rounds: int, timeout_s: float, out: pathlib.Path) -> list[dict]:
    """The family's GPU cases through `gspo-engine bench --json`. The rows of a run that fails or
    runs out of time are kept as far as it got; the cases it did not reach become error rows."""
    command = [sys.executable, "-m", "gspo_engine", "bench", "--kernel", family, "--device", "cuda",
               "--scale", "gpu", "--rounds", str(rounds), "--json"]
    status, output, _ = run_stage(f"benchmarks: {family}", command, timeout_s, out / "logs" / f"bench-{family}.log")
    rows = json_rows(output)
    if status == "ok":
        return rows
    reason = f"{status} after {timeout_s:.0f} s" if status == "timed out" else f"{status}, see bench-{family}.log"
    done = {(row["case"], row["implementation"]) for row in rows}
    return rows + [dict(row, status="error") for row in not_run_rows(family, reason)
                   if (row["case"], row["implementation"]) not in done]


def validate_results(results: dict) -> None:
    """Raise ValueError where `results` departs from the schema (module docstring)."""
    problems = []
    if tuple(results) != TOP_KEYS:
        problems.append(f"top-level keys {tuple(results)} != {TOP_KEYS}")
    if results.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {results.get('schema_version')!r}")
    if tuple(results.get("environment", {})) != ENVIRONMENT_KEYS:
        problems.append(f"environment keys {tuple(results.get('environment', {}))}")
    if set(results.get("ceilings", {})) != {"copy_gb_per_s", "matmul_tflops"}:
        problems.append(f"ceilings keys {tuple(results.get('ceilings', {}))}")
    for stage in ("compile_check", "tests", "training"):
        if results.get(stage, {}).get("status") not in TEST_STATUSES:
            problems.append(f"{stage} status {results.get(stage, {}).get('status')!r}")
    for index, row in enumerate(results.get("rows", [])):
        if tuple(row) != ROW_FIELDS or row["status"] not in ROW_STATUSES:
            problems.append(f"row {index}: keys {tuple(row)}, status {row.get('status')!r}")
    if problems:
        raise ValueError(f"results.json does not follow schema version {SCHEMA_VERSION}: " + "; ".join(problems))


def markdown_report(results: dict) -> list[str]:
    env, ceil, tests, training = results["environment"], results["ceilings"], results["tests"], results["training"]
    compiled = results["compile_check"]
    lines = [f"- date: {results['date']}, commit {results['commit']}", f"- command: `{results['command']}`",
             f"- card: {env['card'] or 'none (CPU: the GPU rows are not run)'}, driver {env['driver'] or '-'}",
             f"- torch {env['torch']}, triton {env['triton'] or '-'}, transformers {env['transformers'] or '-'}, "
             f"liger-kernel {env['liger_kernel'] or 'not installed'}, python {env['python']}"]
    if ceil["matmul_tflops"]:
        lines.append(f"- ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, "
                     f"device copy {ceil['copy_gb_per_s']:.0f} GB/s")
    lines.append(f"- compile check for the card: {compiled['status']} ({compiled['summary']})")
    lines.append(f"- kernel tests on CUDA: {tests['status']} ({tests['summary']})")
    lines.append(f"- `gspo-engine train {TRAIN_CONFIG}` on the GPU: {training['status']} ({training['summary']})")
    return [*lines, "", *markdown_table(results["rows"])]


def write_report(out: pathlib.Path, results: dict) -> list[str]:
    """results.json and gpu_check.md from `results` (checked against the schema first)."""
    validate_results(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown_report(results)
    (out / "gpu_check.md").write_text("\n".join(report) + "\n")
    return report


def archive_logs(out: pathlib.Path) -> None:
    """logs/ into one logs.tar.gz: the device tool brings back a handful of files, not one per stage."""
    logs = out / "logs"
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
        for path in sorted(logs.iterdir()):
            archive.add(path, arcname=f"logs/{path.name}")
    for path in logs.iterdir():
        path.unlink()
    logs.rmdir()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = pathlib.Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    env = environment()
    print("\n".join(f"{key}: {value}" for key, value in env.items()), flush=True)
    gpu = torch.cuda.is_available()
    card_ceilings = ceilings(torch.device("cuda" if gpu else "cpu"))
    print(f"ceilings: {card_ceilings}", flush=True)
    deadline = start + args.budget_s
    not_run = {"status": "not run", "command": None, "seconds": None, "summary": "not reached"}
    results = {
        "schema_version": SCHEMA_VERSION,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "commit": commit,
        "command": shlex.join(["bash", "bench/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
        "environment": env,
        "ceilings": card_ceilings,
        "compile_check": dict(not_run),
        "tests": dict(not_run),
        "training": dict(not_run),
        "rows": [],
        "seconds": None,
    }

    def stage_done(key: str | None = None, value=None) -> None:
        if key is not None:
            results[key] = value
        results["seconds"] = round(time.perf_counter() - start, 1)
        write_report(out, results)

    stage_done()
    if args.skip_tests or args.skip_compile_check:
        flag = "--skip-tests" if args.skip_tests else "--skip-compile-check"
        stage_done("compile_check", {"status": "not run", "command": None, "seconds": None, "summary": flag})
    else:
        stage_done("compile_check", compile_check(out, min(args.compile_timeout_s, (deadline - time.perf_counter()) / 4)))
    if args.skip_tests:
        stage_done("tests", {"status": "not run", "command": None, "seconds": None, "summary": "--skip-tests"})
    else:
        stage_done("tests", kernel_tests(out, min(args.tests_timeout_s, (deadline - time.perf_counter()) / 2)))
    stage_done("training", tiny_training(out, min(args.train_timeout_s, (deadline - time.perf_counter()) / 3)))
    for index, family in enumerate(args.families):
        if not gpu:
            results["rows"] += not_run_rows(family, "no GPU")
            continue
        # what is left, split among the families still to run: a quick family leaves more to the next
        share_s = (deadline - time.perf_counter()) / (len(args.families) - index)
        results["rows"] += family_rows(family, args.rounds, share_s, out)
        stage_done()
    report = write_report(out, dict(results, seconds=round(time.perf_counter() - start, 1)))
    archive_logs(out)
    print("\n" + "\n".join(report), flush=True)
    stages = (results["compile_check"], results["tests"], results["training"])
    failed = any(stage["status"] == "failed" for stage in stages) or any(
        row["status"] == "error" for row in results["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
