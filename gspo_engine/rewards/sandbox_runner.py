"""The program the sandbox starts (`python -I sandbox_runner.py`): confine itself, then run one job.

It reads the job as JSON from stdin, applies the resource limits, drops root privileges when it
has them, then executes the candidate's code and each test step in one namespace. Every test's
outcome is written to the result pipe as `<nonce> <index> pass|fail <exception>` (and an
exception of the solution itself as `<nonce> solution error <exception>`); the nonce keeps lines
the candidate writes itself (it can find the pipe in /proc/self/fd) from counting. The sandbox
protects the machine from the code, not the count from code that goes looking through this
process's own frames for the nonce.

This file imports only the standard library: it must start fast and depend on nothing the
sandboxed process could shadow or lack.
"""

import ctypes
import json
import os
import resource
import sys

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_READ_SEARCH = 2
CAP_LAST_CAP_BOUND = 64


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"sandbox: {what} failed: {os.strerror(ctypes.get_errno())}")


def forbid_privilege_gain() -> None:
    """No exec from here on may gain privileges (a setuid-root program would otherwise give root back)."""
    _check(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def leave_the_network() -> None:
    """Move into a network namespace of its own, which has only a loopback that is down. Root in a
    container without CAP_SYS_ADMIN may not: the code then keeps the machine's network."""
    ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)


def drop_root(uid: int, keep_read_search: bool) -> None:
    """Become `uid`: the kernel never applies RLIMIT_NPROC to root, and another uid cannot read the
    trainer's /proc/<pid>/environ. `keep_read_search` keeps CAP_DAC_READ_SEARCH only, for an
    interpreter installed where other users cannot read it (e.g. under /root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if keep_read_search:
        _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    # Whatever this process execs must not regain a dropped capability.
    for cap in range(CAP_LAST_CAP_BOUND):
        if not (keep_read_search and cap == CAP_DAC_READ_SEARCH):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if keep_read_search:
        header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        kept = 1 << CAP_DAC_READ_SEARCH
        data = (_CapData * 2)(_CapData(kept, kept, 0), _CapData(0, 0, 0))
        _check(libc.capset(ctypes.byref(header), data), "capset")


def apply_limits(limits: dict) -> None:
    cpu_s = limits["cpu_s"]
    # The soft limit sends SIGXCPU (fatal by default); the hard one SIGKILLs a process that catches it.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    memory = limits["memory_mib"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    file_size = limits["file_size_mib"] * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_job(job: dict, report, exec=exec, compile=compile, type=type, BaseException=BaseException) -> None:
    """The builtins this loop uses are bound when it is defined: code that replaces `builtins.exec`
    with a no-op must not make every later test pass."""
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(job["solution"], "<solution>", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 - the candidate may raise anything, SystemExit included
        report("solution", "error", type(error).__name__)
    for index, source in job["steps"]:
        try:
            exec(compile(source, f"<test {index}>", "exec"), namespace)
        except BaseException as error:  # noqa: BLE001
            if index >= 0:
                report(index, "fail", type(error).__name__)
            continue
        if index >= 0:
            report(index, "pass", "")


def main() -> None:
    job = json.load(sys.stdin)
    sys.stdin.close()
    apply_limits(job["limits"])
    if job["uid"] is not None:
        leave_the_network()
        drop_root(job["uid"], job["keep_read_search"])
    forbid_privilege_gain()
    results = os.fdopen(job["result_fd"], "w", buffering=1)
    nonce = job.pop("nonce")

    def report(index, outcome: str, reason: str) -> None:
        results.write(f"{nonce} {index} {outcome} {reason}\n")

    run_job(job, report)
    results.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
