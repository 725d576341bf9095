"""bench/gpu_check.py and the benchmark cases, as far as a machine without a GPU can check them."""

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

from bench import gpu_check
from gspo_engine.benchmarks import FAMILIES, ROW_FIELDS, fused_linear, markdown_table, run_case
from gspo_engine.benchmarks.cases import Case, empty_row, measured_row
from gspo_engine.benchmarks.e2e import QWEN3_30B_A3B_WIDTHS, matmul_params_per_token, model_dict
from gspo_engine.cli import main as cli

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")


def test_arguments_default_to_every_family():
    args = gpu_check.parse_args([])
    assert args.families == list(FAMILIES) and args.out == "bench/out" and not args.skip_tests


def test_arguments_take_a_family_list_and_refuse_unknown_families(capsys):
    assert gpu_check.parse_args(["--families", "loss,e2e", "--rounds", "3"]).families == ["loss", "e2e"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--families", "loss,softmax"])
    assert "unknown family 'softmax'" in capsys.readouterr().err


@no_gpu
def test_cpu_run_exits_0_and_writes_schema_and_table_with_gpu_rows_not_run(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--skip-tests"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    gpu_check.validate_results(results)
    assert results["environment"]["card"] is None and results["ceilings"]["matmul_tflops"] is None
    assert results["compile_check"]["status"] == "not run"
    assert {row["kernel"] for row in results["rows"]} == set(FAMILIES)
    assert all(row["status"] == "not run" for row in results["rows"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "B=4 T=4096 H=4096 V=151936" in table and "235b-a22b" in table and "sequence B=512 T=2048" in table
    assert table.count("not run: no GPU") == len(results["rows"])
    assert capsys.readouterr().out.rstrip().endswith(table.rstrip().splitlines()[-1])


def test_schema_check_names_what_is_wrong():
    results = {"schema_version": 3, "date": "d", "commit": "c", "command": "x",
               "environment": dict.fromkeys(gpu_check.ENVIRONMENT_KEYS), "ceilings": {"copy_gb_per_s": None,
               "matmul_tflops": None}, "compile_check": {"status": "not run"}, "tests": {"status": "not run"},
               "training": {"status": "not run"}, "rows": [], "seconds": 0.0}
    gpu_check.validate_results(results)
    case = Case(kernel="loss", name="n", unit="GB/s", work=1.0, builders={})
    with pytest.raises(ValueError, match="row 0"):
        gpu_check.validate_results(dict(results, rows=[dict(empty_row(case, "reference", "done"))]))
    with pytest.raises(ValueError, match="tests status"):
        gpu_check.validate_results(dict(results, tests={"status": "green"}))
    with pytest.raises(ValueError, match="training status"):
        gpu_check.validate_results(dict(results, training={}))
    with pytest.raises(ValueError, match="compile_check status"):
        gpu_check.validate_results(dict(results, compile_check={"status": "ok"}))
    with pytest.raises(ValueError, match="top-level keys"):
        gpu_check.validate_results({key: value for key, value in results.items() if key != "compile_check"})


def test_table_formats_throughput_fractions_ratios_and_escapes_notes():
    case = Case(kernel="moe", name="n=4", unit="TFLOP/s", work=2e12, builders={})
    row = measured_row(case, "gspo_kernels", 0.5, 123.4, {"copy_gb_per_s": 3000.0, "matmul_tflops": 800.0})
    row["vs_reference"] = 2.0
    failed = empty_row(case, "peer", "error", "RuntimeError: a | b\nsecond line")
    lines = markdown_table([row, failed])
    assert lines[2] == "| moe | n=4 | gspo_kernels | 500 | 123.4 | 4 TFLOP/s | 0.5% | 2.00x | ok |"
    assert lines[3].endswith("| error: RuntimeError: a / b second line |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_mfu_of_tokens_rows_divides_model_flops_by_the_matmul_ceiling():
    case = Case(kernel="e2e", name="update", unit="tokens/s", work=1000, flops=4e14, builders={})
    row = measured_row(case, "gspo_engine", 2.0, None, {"copy_gb_per_s": None, "matmul_tflops": 800.0})
    assert row["throughput"] == 500 and row["fraction_of_ceiling"] == pytest.approx(0.25)


def test_active_parameters_of_qwen3_30b_a3b_are_its_published_3_3b():
    """The FLOPs formula's weights per token, with the embedding, at the full 48 layers."""
    model = model_dict(QWEN3_30B_A3B_WIDTHS, 48)
    embedding = model["vocab_size"] * model["hidden_size"]
    assert matmul_params_per_token(model) + embedding == pytest.approx(3.3e9, rel=0.03)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_case_runs_on_cpu_at_smoke_shapes(family):
    device = torch.device("cpu")
    for case in FAMILIES[family](device, "smoke"):
        rows = run_case(case, device, rounds=1, ceilings={"copy_gb_per_s": None, "matmul_tflops": None})
        assert [tuple(row) for row in rows] == [ROW_FIELDS] * len(rows)
        assert all(row["status"] in ("ok", "skipped") for row in rows), [r["note"] for r in rows]
        baseline = next(row for row in rows if row["implementation"] == case.baseline)
        assert baseline["vs_reference"] == 1.0
        assert all(row["median_ms"] > 0 and row["throughput"] > 0 for row in rows if row["status"] == "ok")


def test_a_failing_implementation_becomes_an_error_row_and_the_rest_still_run():
    def broken():
        raise RuntimeError("out of memory")

    case = Case(kernel="loss", name="n", unit="GB/s", work=1e9,
                builders={"reference": lambda: (lambda: None), "broken": broken})
    rows = run_case(case, torch.device("cpu"), rounds=1, ceilings={})
    assert [row["status"] for row in rows] == ["ok", "error"]
    assert rows[1]["note"] == "RuntimeError: out of memory"


def test_on_cpu_the_implementations_take_turns_and_one_failing_midway_leaves_the_others():
    calls = []

    def builder(name, fail_at=None):
        def build():
            def step():
                calls.append(name)
                if fail_at is not None and calls.count(name) == fail_at:
                    raise RuntimeError("lost")
            return step
        return build

    case = Case(kernel="loss", name="n", unit="GB/s", work=1e9,
                builders={"reference": builder("reference"), "a": builder("a"), "b": builder("b", fail_at=2)})
    rows = run_case(case, torch.device("cpu"), rounds=3, ceilings={})
    # A warm-up call each, then rounds in turn; "b" fails at its first timed call and is dropped.
    assert calls == ["reference", "a", "b", "reference", "a", "b", "reference", "a", "reference", "a"]
    assert [row["status"] for row in rows] == ["ok", "ok", "error"]
    assert rows[2]["note"] == "RuntimeError: lost" and rows[1]["vs_reference"] > 0


def test_cli_bench_offers_every_family_and_prints_json_rows():
    assert list(cli.commands["bench"].params[0].type.choices) == list(FAMILIES)
    result = CliRunner().invoke(cli, ["bench", "--kernel", "loss", "--scale", "smoke", "--rounds", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert {row["implementation"] for row in rows} == {"reference", "gspo_kernels"}
    assert all(tuple(row) == ROW_FIELDS for row in rows)


@no_gpu
def test_compile_check_is_not_run_without_a_gpu(tmp_path):
    assert gpu_check.card_arch() is None
    assert gpu_check.compile_check(tmp_path, 60) == {"status": "not run", "command": None, "seconds": None,
                                                     "summary": "no GPU"}


def test_compile_check_runs_for_the_cards_architecture_and_reports_its_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "card_arch", lambda: 90)
    calls = []

    def stage(name, command, timeout_s, log):
        calls.append(command)
        return "failed", "... rows\n1043 rows, 12 kernels; specialisations per arch: sm_90 917; FAILED: 1 rows\n", 7.0

    monkeypatch.setattr(gpu_check, "run_stage", stage)
    result = gpu_check.compile_check(tmp_path, 60)
    assert calls[0][1:5] == ["-m", "gspo_kernels.compile_check", "--arch", "90"]
    assert result["status"] == "failed" and result["summary"].endswith("FAILED: 1 rows") and result["seconds"] == 7.0
    monkeypatch.setattr(gpu_check, "card_arch", lambda: 86)
    assert gpu_check.compile_check(tmp_path, 60)["status"] == "not run"


def test_json_rows_are_read_past_what_libraries_print_and_a_line_cut_short():
    printed = 'a warning\n{"kernel": "loss"}\n{"kernel": "moe"}\n{"kernel": "e2'
    assert gpu_check.json_rows(printed) == [{"kernel": "loss"}, {"kernel": "moe"}]


def test_a_family_that_runs_out_of_time_keeps_its_rows_and_marks_the_rest(tmp_path, monkeypatch):
    first = gpu_check.not_run_rows("loss", "")[0]
    finished = dict(first, status="ok", median_ms=1.0, note=None)
    monkeypatch.setattr(gpu_check, "run_stage", lambda *args: ("timed out", json.dumps(finished) + "\n", 9.0))
    rows = gpu_check.family_rows("loss", rounds=1, timeout_s=9, out=tmp_path)
    assert rows[0] == finished and len(rows) == len(gpu_check.not_run_rows("loss", ""))
    assert all(row["status"] == "error" and row["note"] == "timed out after 9 s" for row in rows[1:])


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_the_triton_grpo_loss_peer_runs_its_gpu_call_in_the_interpreter():
    """The GPU-only peer's call (shapes, contiguity, options), through Triton's interpreter at a tiny shape."""
    inputs = fused_linear.make_inputs(2, 8, 16, 64)
    fused_linear.make_step("liger-triton", inputs)()
    assert inputs["hidden"].grad.isfinite().all() and inputs["weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("name", fused_linear.IMPLEMENTATIONS)
def test_every_fused_linear_step_runs_again(name):
    """A benchmark calls one step many times: nothing in it may be good for one call only."""
    if name == "liger-triton" or not fused_linear.available(name):
        pytest.skip(f"{name} does not run here")
    inputs = fused_linear.make_inputs(2, 8, 16, 64)
    step = fused_linear.make_step(name, inputs)
    step()
    step()
    assert inputs["hidden"].grad is not None and torch.isfinite(inputs["hidden"].grad).all()


def test_failed_tests_are_named_from_pytest_s_short_summary():
    output = ("....F.E\n=== short test summary info ===\n"
              "FAILED tests/test_a.py::test_one[bf16] - AssertionError: x\n"
              "ERROR tests/test_b.py::test_two - RuntimeError\nFAILED\n2 failed, 5 passed in 3.1s\n")
    assert gpu_check.failed_tests(output) == ["tests/test_a.py::test_one[bf16]", "tests/test_b.py::test_two"]
    assert gpu_check.failed_tests("....\n4 passed in 1s\n") == []
