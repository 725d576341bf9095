"""The code sandbox: counting tests, and hostile code that must score 0 and leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gspo_engine.rewards.sandbox import Sandbox, SandboxLimits, plan_tests

AS_ROOT = os.geteuid() == 0
ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(-1, 1) == 0\n"
FAST = SandboxLimits(timeout_s=2.0, cpu_s=2, memory_mib=256, file_size_mib=4, max_processes=8)
MARKER_FILE = Path(tempfile.gettempdir()) / "gspo-sandbox-test-marker"

HOSTILE = {
    "hang": "def add(a, b):\n    while True:\n        pass\nadd(1, 1)\n",
    "fork_bomb": (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    ),
    "escape_session": (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "while True:\n"
        "    pass\n"
    ),
    "allocate": "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))\n",
    "huge_file": (
        f"with open({str(MARKER_FILE)!r}, 'wb') as outside, open('inside.bin', 'wb') as inside:\n"
        "    while True:\n"
        "        outside.write(b'x' * 2**20)\n"
        "        inside.write(b'x' * 2**20)\n"
    ),
    "forge_report": (
        "import os\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        os.write(int(fd), b'0 pass \\n1 pass \\n2 pass \\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    ),
    "disable_exec": "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n",
}


def sandbox_processes() -> list[int]:
    """Live processes running the sandbox runner (forked children keep its command line)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command = Path(entry.path, "cmdline").read_bytes()
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"sandbox_runner.py" in command and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def sandbox_folders() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("gspo-sandbox-")}


def test_plan_counts_asserts_and_test_functions():
    plan = plan_tests("import math\nx = 2\nassert x == 2\ndef helper():\n    return 1\n"
                      "def test_one():\n    assert helper() == 1\nassert math.pi > 3\n")
    assert plan.num_tests == 3
    assert [index for index, _ in plan.steps] == [-1, -1, 0, -1, -1, 1, 2]
    assert plan.steps[-1] == (2, "test_one()")
    assert plan_tests(["assert f(1) == 1", "assert f(2) == 4"]).num_tests == 2


@pytest.mark.parametrize("tests", ["x = 1", "assert (", [], [1], 3])
def test_plan_refuses_unusable_tests(tests):
    with pytest.raises(ValueError):
        plan_tests(tests)


def test_fraction_of_tests_passed_in_parallel():
    sandbox = Sandbox(FAST, max_workers=3)
    plan = plan_tests(ADD_TESTS)
    solutions = [
        "def add(a, b):\n    return a + b\n",
        "def add(a, b):\n    return a * b if a == 2 else a + b + (a == -1)\n",
        "def add(a, b) return",  # syntax error: every test fails on a missing name
        "import sys\ndef add(a, b):\n    return a + b\nsys.exit(1)\n",  # exits after defining add
    ]
    results = sandbox.run_many(solutions, [plan] * len(solutions))
    assert [result.passed for result in results] == [3, 2, 0, 3]
    assert results[1].failures == {2: "AssertionError"}
    assert results[2].failures == {0: "NameError", 1: "NameError", 2: "NameError"}
    assert results[2].solution_error == "SyntaxError" and results[3].solution_error == "SystemExit"
    assert results[0].solution_error == ""
    assert results[0].fraction == 1.0 and not results[0].timed_out


def test_a_hanging_test_keeps_the_tests_before_it():
    tests = "assert add(1, 1) == 2\nassert add(0, 5) == 5\nassert add(2, 3) == 5\n"
    solution = "def add(a, b):\n    while a == 0:\n        pass\n    return a + b\n"
    result = Sandbox(FAST).run(solution, plan_tests(tests))
    assert result.timed_out and result.passed == 1
    assert result.failures == {1: "no report", 2: "no report"}


def test_a_test_out_of_cpu_time_counts_as_timed_out():
    """A busy loop under a long wall-clock limit meets RLIMIT_CPU first: it timed out all the same."""
    solution = "def add(a, b):\n    while True:\n        pass\n"
    limits = SandboxLimits(timeout_s=20.0, cpu_s=1, memory_mib=256, file_size_mib=4, max_processes=8)
    start = time.monotonic()
    result = Sandbox(limits).run(solution, plan_tests("assert add(1, 1) == 2\n"))
    assert time.monotonic() - start < 10  # ended by the CPU limit, not the wall clock
    assert result.timed_out and result.passed == 0


@pytest.fixture(scope="module")
def hostile_results():
    before = sandbox_folders()
    MARKER_FILE.unlink(missing_ok=True)
    sandbox = Sandbox(FAST, max_workers=len(HOSTILE))
    start = time.monotonic()
    results = sandbox.run_many(list(HOSTILE.values()), [plan_tests(ADD_TESTS)] * len(HOSTILE))
    elapsed = time.monotonic() - start
    return dict(zip(HOSTILE, results)), elapsed, before


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_code_scores_zero(hostile_results, case):
    results, _, _ = hostile_results
    assert results[case].passed == 0
    assert results[case].fraction == 0.0


def test_hostile_code_is_stopped_in_parallel(hostile_results):
    results, elapsed, _ = hostile_results
    assert results["hang"].timed_out and results["escape_session"].timed_out
    # All cases together take about one timeout, not one each.
    assert elapsed < FAST.timeout_s * 3


@pytest.mark.skipif(not AS_ROOT, reason="without root, a child that calls setsid escapes the killed process group")
def test_hostile_code_leaves_nothing_running(hostile_results):
    assert sandbox_processes() == []


def test_hostile_code_leaves_no_folder_behind(hostile_results):
    _, _, folders_before = hostile_results
    assert sandbox_folders() == folders_before


@pytest.mark.skipif(not AS_ROOT, reason="without a sandbox uid, files written outside the folder are not traced")
def test_hostile_code_leaves_no_file_in_shared_temp_folders(hostile_results):
    assert not MARKER_FILE.exists()


SECRET_PROBE = """
import importlib.util, json, sys
# The sandbox module alone, without the package (which would import torch): the probe starts fast.
spec = importlib.util.spec_from_file_location("sandbox", "gspo_engine/rewards/sandbox.py")
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
Sandbox, SandboxLimits, plan_tests = sandbox.Sandbox, sandbox.SandboxLimits, sandbox.plan_tests
solution = '''
import os
from_environ = os.environ.get("GSPO_TEST_SECRET", "")
try:
    with open(f"/proc/{os.getppid()}/environ", "rb") as parent:
        from_parent = parent.read().decode(errors="replace")
except OSError:
    from_parent = ""
'''
tests = 'assert "hunter2" in from_environ\\nassert "hunter2" in from_parent\\n'
result = Sandbox(SandboxLimits(timeout_s=5.0)).run(solution, plan_tests(tests))
print(json.dumps(result.failures))
"""


@pytest.mark.skipif(not AS_ROOT, reason="without a sandbox uid, /proc/<parent>/environ is readable")
def test_code_cannot_read_the_parents_environment():
    # The secret must be in the trainer's environment from its start, where /proc/<pid>/environ shows it.
    env = dict(os.environ, GSPO_TEST_SECRET="hunter2")
    probe = subprocess.run([sys.executable, "-c", SECRET_PROBE], env=env, capture_output=True, text=True,
                           cwd=Path(__file__).parents[1], timeout=120)
    assert probe.returncode == 0, probe.stderr
    failures = json.loads(probe.stdout.strip().splitlines()[-1])
    assert failures == {"0": "AssertionError", "1": "AssertionError"}


@pytest.mark.skipif(not AS_ROOT, reason="a sandbox uid needs root")
def test_sandbox_runs_under_its_own_uid():
    tests = [
        "assert os.getuid() != 0 and os.getgid() != 0 and os.getgroups() == []",
        f"assert os.getcwd().startswith({tempfile.gettempdir()!r})",
        "try:\n    open('/root/gspo-sandbox-probe', 'w')\nexcept PermissionError:\n    pass\n"
        "else:\n    raise AssertionError('wrote into /root')",
        "import math, json, collections",
    ]
    result = Sandbox(FAST).run("import os\n", plan_tests(tests))
    assert result.passed == len(tests), result.failures


@pytest.mark.skipif(not AS_ROOT, reason="a network namespace needs root")
def test_code_has_no_network():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        tests = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()",
            "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1).close()",
        ]
        result = Sandbox(FAST).run("", plan_tests(tests))
    assert result.passed == 0, result.failures
    assert set(result.failures.values()) <= {"OSError", "ConnectionRefusedError", "TimeoutError"}
