"""Run untrusted Python against tests in a confined process, several samples in parallel.

Each sample gets its own `python -I` process (no user site, no PYTHON* variables, no script
folder on sys.path) in a fresh temporary folder, with an environment that holds none of the
trainer's variables, limits on CPU time, address space, file size and process count, and a
wall-clock timeout that kills its whole process group.

When the trainer runs as root (the usual container), the child also switches to a uid of its own
(one per worker slot of this process): the kernel does not apply RLIMIT_NPROC to root, and
another uid can neither read the trainer's /proc/<pid>/environ nor write root's files. Cleanup
then kills every process of that uid (which catches a child that left the process group with
setsid) and removes what the uid left in the shared temporary folders. Where the kernel allows
it, the child also gets a network namespace of its own, with no network in it. If the
interpreter is installed where other users cannot read it (pyenv under /root), the child keeps
CAP_DAC_READ_SEARCH so that it can import the standard library, and can then read (not write)
any file on the machine.

Run as an ordinary user, the child keeps the trainer's uid: the process count limit then counts
all of that user's processes; a child that calls setsid, one that reads
/proc/<trainer pid>/environ, and the network are beyond what the sandbox can stop.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

RUNNER = Path(__file__).with_name("sandbox_runner.py")
# Sandbox uids sit far above any real account; each trainer process gets its own block of
# MAX_WORKERS uids (pid_max is at most 2**22), shared by all its Sandbox objects.
SANDBOX_UID_BASE = 1 << 30
MAX_WORKERS = 64
_FREE_SLOTS: queue.Queue[int] = queue.Queue()
for _slot in range(MAX_WORKERS):
    _FREE_SLOTS.put(_slot)
SHARED_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mib: int = 512
    file_size_mib: int = 16
    max_processes: int = 16

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mib", "file_size_mib", "max_processes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class TestPlan:
    """The steps to run after the solution: `(index, source)` pairs, index -1 for setup code."""

    steps: tuple[tuple[int, str], ...]
    num_tests: int


@dataclass(frozen=True)
class SandboxResult:
    passed: int
    num_tests: int
    timed_out: bool
    failures: dict[int, str]  # test index -> exception type name, or "no report" when it never finished
    solution_error: str  # exception type the solution's own code raised, "" when none

    @property
    def fraction(self) -> float:
        return self.passed / self.num_tests


def plan_tests(tests: str | list[str]) -> TestPlan:
    """How the `tests` column turns into counted tests.

    A list of strings: each string is one test. A string: every top-level `assert` statement is
    one test, and every top-level function named `test_*` is one test (defined in order, called
    after everything else); any other statement (imports, helpers, assignments) is setup that runs
    in place and counts for nothing.
    """
    if isinstance(tests, (list, tuple)):
        if not tests or not all(isinstance(test, str) for test in tests):
            raise ValueError("a `tests` list must hold one or more strings of Python code")
        return TestPlan(tuple(enumerate(tests)), len(tests))
    if not isinstance(tests, str):
        raise ValueError(f"`tests` must be Python source or a list of sources, got {type(tests).__name__}")
    try:
        module = ast.parse(tests)
    except SyntaxError as error:
        raise ValueError(f"`tests` is not valid Python: {error}") from error
    steps: list[tuple[int, str]] = []
    test_functions: list[str] = []
    count = 0
    for statement in module.body:
        if isinstance(statement, ast.Assert):
            steps.append((count, ast.unparse(statement)))
            count += 1
        else:
            steps.append((-1, ast.unparse(statement)))
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) and statement.name.startswith("test"):
                test_functions.append(statement.name)
    for name in test_functions:
        steps.append((count, f"{name}()"))
        count += 1
    if count == 0:
        raise ValueError("`tests` holds no assert statement and no test_* function")
    return TestPlan(tuple(steps), count)


def _world_readable(path: Path) -> bool:
    """Whether a user with no relation to the owner can reach `path` and read it."""
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        needed = stat.S_IXOTH | (stat.S_IROTH if part == path else 0)
        if mode & needed != needed:
            return False
    return True


class Sandbox:
    """Runs solutions against test plans, `max_workers` at a time."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), max_workers: int = 4):
        if not 1 <= max_workers <= MAX_WORKERS:
            raise ValueError(f"max_workers must be in 1..{MAX_WORKERS}, got {max_workers}")
        self.limits = limits
        self.max_workers = max_workers
        self._as_root = os.geteuid() == 0
        # The runner starts as root; what the code imports after the uid switch must stay readable.
        library_paths = {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
        self._keep_read_search = self._as_root and not all(_world_readable(Path(p)) for p in library_paths)

    def run_many(self, solutions: list[str], plans: list[TestPlan]) -> list[SandboxResult]:
        if len(solutions) != len(plans):
            raise ValueError(f"{len(solutions)} solutions but {len(plans)} test plans")
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, solutions, plans))

    def run(self, solution: str, plan: TestPlan) -> SandboxResult:
        # Each slot is a uid that no other running sample uses; past MAX_WORKERS at once, callers wait.
        slot = _FREE_SLOTS.get()
        try:
            uid = SANDBOX_UID_BASE + os.getpid() * MAX_WORKERS + slot if self._as_root else None
            return self._run_as(solution, plan, uid)
        finally:
            _FREE_SLOTS.put(slot)

    def _run_as(self, solution: str, plan: TestPlan, uid: int | None) -> SandboxResult:
        workdir = Path(tempfile.mkdtemp(prefix="gspo-sandbox-"))
        read_end, write_end = os.pipe()
        nonce = secrets.token_hex(16)
        try:
            if uid is not None:
                os.chown(workdir, uid, uid)
            job = {
                "solution": solution, "steps": plan.steps, "nonce": nonce, "result_fd": write_end,
                "uid": uid, "keep_read_search": self._keep_read_search,
                "limits": {"cpu_s": self.limits.cpu_s, "memory_mib": self.limits.memory_mib,
                           "file_size_mib": self.limits.file_size_mib, "max_processes": self.limits.max_processes},
            }
            process = subprocess.Popen(
                [sys.executable, "-I", str(RUNNER)],
                cwd=workdir, env=self._child_env(workdir), stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(write_end,), start_new_session=True,
            )
            os.close(write_end)
            write_end = -1
            try:
                try:
                    process.stdin.write(json.dumps(job).encode())
                    process.stdin.close()
                except BrokenPipeError:
                    pass
                timed_out = not _wait_unreaped(process.pid, self.limits.timeout_s)
            finally:
                self._kill_everything(process, uid)
            # Out of CPU time is out of time too: a busy loop meets RLIMIT_CPU (SIGXCPU) or the wall
            # clock first depending on how busy the machine is.
            timed_out = timed_out or process.returncode == -signal.SIGXCPU
            report = self._read_available(read_end)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
            self._remove_tree(workdir)
            if uid is not None:
                self._remove_files_of(uid)
        return self._parse_report(report, nonce, plan, timed_out)

    @staticmethod
    def _child_env(workdir: Path) -> dict[str, str]:
        # Nothing from the trainer's environment: only what a plain interpreter needs.
        return {
            "PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }

    @staticmethod
    def _kill_everything(process: subprocess.Popen, uid: int | None) -> None:
        """Kill the process group while its leader is still unreaped (so its id cannot belong to anyone
        else), then, with a sandbox uid, every live process of that uid. The kernel delivers a group
        SIGKILL to all members at once and refuses fork in a process with a pending SIGKILL, so
        nothing started by the group outlives this."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        if uid is None:
            return
        for _ in range(1000):
            pids = _live_pids_of_uid(uid)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.001)
        raise RuntimeError(f"sandbox processes of uid {uid} survive SIGKILL: {_live_pids_of_uid(uid)}")

    @staticmethod
    def _read_available(read_end: int) -> str:
        os.set_blocking(read_end, False)
        chunks = []
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    @staticmethod
    def _parse_report(report: str, nonce: str, plan: TestPlan, timed_out: bool) -> SandboxResult:
        outcomes: dict[int, str] = {}
        solution_error = ""
        for line in report.splitlines():
            fields = line.split(" ", 3)
            if len(fields) < 3 or fields[0] != nonce:
                continue
            reason = fields[3] if len(fields) > 3 else ""
            if fields[1] == "solution":
                solution_error = reason
            elif fields[1].isdigit() and int(fields[1]) < plan.num_tests:
                outcomes.setdefault(int(fields[1]), "" if fields[2] == "pass" else reason or "fail")
        failures = {
            index: outcomes.get(index, "no report") for index in range(plan.num_tests) if outcomes.get(index) != ""
        }
        return SandboxResult(plan.num_tests - len(failures), plan.num_tests, timed_out, failures, solution_error)

    @staticmethod
    def _remove_tree(path: Path) -> None:
        def make_writable_and_retry(function, failed_path, _error):
            # The sandboxed code may have removed its own permissions on what it created.
            os.chmod(os.path.dirname(failed_path), stat.S_IRWXU)
            if os.path.isdir(failed_path) and not os.path.islink(failed_path):
                os.chmod(failed_path, stat.S_IRWXU)
            function(failed_path)

        shutil.rmtree(path, onerror=make_writable_and_retry)

    def _remove_files_of(self, uid: int) -> None:
        for folder in SHARED_TEMP_DIRS:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        self._remove_tree(Path(entry.path))
                    else:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `pid` to exit without reaping it; whether it exited."""
    deadline = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _live_pids_of_uid(uid: int) -> list[int]:
    """Processes whose real uid is `uid`, zombies left out (/proc/<pid> itself belongs to root once a
    process changed uid, so the status file is read)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids
