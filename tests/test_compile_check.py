"""gspo_kernels.compile_check: every kernel builds for the GPUs users run, checked without one.

The tests run the check in a subprocess without TRITON_INTERPRET (conftest sets it for the
interpreter tests; compiling for a GPU needs the real JIT).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Triton compiles on Linux")


def run_python(*args: str, timeout: int = 3000) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_check(*args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "gspo_kernels.compile_check", *args)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run the kernels")
# One specialisation of every kernel but the MoE GEMMs, at bf16 and large blocks.
ONE_OF_EACH = (r"^(_gspo_\w+ bf16 token .*KL_WEIGHTED=True BLOCK_T=512|_gspo_reduce_kernel fp32 token .*COUNT_EMPTY=True"
               r"|_tile_stats_kernel bias bf16 HAS_BIAS=True WITH_ENTROPY=True"
               r"|_tile_dlogits_kernel bf16 bias bf16 HAS_BIAS=True WITH_ENTROPY=True"
               r"|_route_topk_kernel bf16 E=128 .*NORMALIZE=True FORCED=False"
               r"|_(count_experts|place_pairs)_kernel E=128|_tile_table_kernel E=128 BLOCK_M=128)")


def rows_of(report: pathlib.Path) -> list[dict]:
    return json.loads(report.read_text())


@NO_GPU
def test_moe_training_tiles_compile_for_hopper_into_pipelined_wgmma_loops_without_spills(tmp_path):
    """sm_90, bf16, BLOCK_M = 128: the GEMM tiles of MoE training at Qwen3 shapes, which spilled before."""
    report = tmp_path / "rows.json"
    result = run_check("--arch", "90", "--match", r"^_(gate_up|scatter_matmul|swiglu_grad)_kernel bf16 .*BLOCK_M=128",
                       "--json", str(report))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = rows_of(report)
    assert {row["kernel"] for row in rows} == {"_gate_up_kernel", "_scatter_matmul_kernel", "_swiglu_grad_kernel"}
    for row in rows:
        assert row["error"] is None and row["spill_bytes"] == 0 and row["shared_bytes"] <= 227 * 1024, row
        assert row["pipelined"] and row["wgmma"], row
    assert result.stdout.strip().splitlines()[-1].endswith("passed")


@NO_GPU
def test_every_other_kernel_compiles_for_hopper_and_every_kernel_is_listed(tmp_path):
    report = tmp_path / "rows.json"
    result = run_check("--arch", "90", "--match", ONE_OF_EACH, "--json", str(report))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {row["kernel"] for row in rows_of(report)} == {
        "_gspo_forward_kernel", "_gspo_backward_kernel", "_gspo_reduce_kernel", "_tile_stats_kernel", "_tile_dlogits_kernel",
        "_route_topk_kernel", "_count_experts_kernel", "_place_pairs_kernel", "_tile_table_kernel",
    }
    listed = run_python("-c", "from gspo_kernels import compile_check as c; "
                              "print([row.kernel for row in c.missing_kernels(c.all_specialisations())])")
    assert listed.returncode == 0 and listed.stdout.strip() == "[]", listed.stdout + listed.stderr


# Thousands of compiles: too long for the default run on a 2-core machine; `pytest -m compile_all` runs it,
# as does `python -m gspo_kernels.compile_check --arch 80,90,100`.
@pytest.mark.slow
@pytest.mark.compile_all
@NO_GPU
def test_every_specialisation_compiles_for_a100_h100_and_b200(tmp_path):
    report = tmp_path / "rows.json"
    result = run_check("--arch", "80,90,100", "--json", str(report))
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    rows = rows_of(report)
    assert {row["arch"] for row in rows} == {80, 90, 100}
    assert all(row["error"] is None and row["spill_bytes"] == 0 for row in rows)
    assert len({row["kernel"] for row in rows}) == 12


BROKEN = textwrap.dedent('''
    import sys

    import torch
    import triton
    import triton.language as tl

    from gspo_kernels import compile_check


    @triton.jit
    def _broken_static_assert_kernel(x_ptr, BLOCK: tl.constexpr):
        tl.static_assert(BLOCK < 0, "BLOCK must be negative")
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)


    @triton.jit
    def _broken_too_much_shared_kernel(a_ptr, b_ptr, out_ptr, K, BLOCK: tl.constexpr):
        rows = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            a = tl.load(a_ptr + rows[:, None] * K + (k0 + rows)[None, :])
            b = tl.load(b_ptr + (k0 + rows)[:, None] * BLOCK + rows[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(out_ptr + rows[:, None] * BLOCK + rows[None, :], acc)


    def broken():
        return [
            compile_check.Specialisation(_broken_static_assert_kernel, "BLOCK=16", {"x_ptr": torch.float32},
                                         {"BLOCK": 16}),
            compile_check.Specialisation(_broken_too_much_shared_kernel, "bf16 BLOCK=256",
                                         {"a_ptr": torch.bfloat16, "b_ptr": torch.bfloat16, "out_ptr": torch.float32,
                                          "K": 4096}, {"BLOCK": 256}, num_warps=8, num_stages=4),
        ]


    compile_check.SPECIALISATION_SOURCES += (broken,)
    sys.exit(compile_check.main(sys.argv[1:]))
''')


@NO_GPU
def test_a_kernel_that_cannot_build_or_fit_is_reported_and_fails_the_check(tmp_path):
    script = tmp_path / "broken_kernels.py"
    script.write_text(BROKEN)
    result = run_python(str(script), "--arch", "90", "--match", "_broken")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("_broken")}
    assert "FAIL" in rows["_broken_static_assert_kernel"] and "BLOCK must be negative" in result.stdout
    assert "shared memory 1024 KiB > 227 KiB" in rows["_broken_too_much_shared_kernel"]
    assert "FAILED: 2 rows" in result.stdout.strip().splitlines()[-1]


def test_a_kernel_without_specialisations_is_reported(monkeypatch):
    from gspo_kernels import compile_check

    monkeypatch.setattr(compile_check, "kernels_in_package", lambda: {"_gate_up_kernel": None, "_new_kernel": None})
    specs = [compile_check.Specialisation("_gate_up_kernel", "-", {}, {})]
    monkeypatch.setattr(compile_check.Specialisation, "name", property(lambda spec: spec.kernel))
    missing = compile_check.missing_kernels(specs)
    assert [(row.kernel, row.ok) for row in missing] == [("_new_kernel", False)]
