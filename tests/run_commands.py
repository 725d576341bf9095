"""Several `gspo-engine` command lines (train, export) run one after another in one process, plain or under
torchrun, for the distributed tests: a launch pays process start-up, imports and the process group once for
all of them. Each command's output and exit status go to files of their own, as a separate run's would.
A command may instead name a rank script of tests/ ("module": its main(*args) runs in the same process group).
Under torchrun the process group (gloo) is made once, before the first command: every command finds it.

    python tests/run_commands.py COMMANDS.json
    torchrun --nproc_per_node N tests/run_commands.py COMMANDS.json

COMMANDS.json: {"folder": LOGS, "timeout_s": T, "commands": [{"name": NAME, "args": [...]}, ...]}, args as
given to gspo-engine (or to the main of "module"). Every rank writes LOGS/NAME.rankR.json: {"returncode",
"stdout", "stderr"}. A command still running after T seconds ends the process with every thread's stack on
stderr, so a hang fails the launch and shows where it stood. Every run seeds itself from its config, so what
it computes does not depend on the runs before it in the process.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import importlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from gspo_engine.cli import main as gspo_engine


def run(args: list[str], module: str | None) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            if module is None:
                gspo_engine(args, prog_name="gspo-engine")  # click ends every command with SystemExit
            else:
                importlib.import_module(module).main(*args)
            code = 0
        except SystemExit as end:
            code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
        except Exception:  # what would end a separate process with a traceback
            traceback.print_exc()
            code = 1
    return code, stdout.getvalue(), stderr.getvalue()


def main(commands_file: str) -> None:
    spec = json.loads(Path(commands_file).read_text())
    folder, rank = Path(spec["folder"]), os.environ.get("RANK", "0")
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    for command in spec["commands"]:
        faulthandler.dump_traceback_later(spec["timeout_s"], exit=True, file=sys.__stderr__)
        code, stdout, stderr = run(command["args"], command.get("module"))
        faulthandler.cancel_dump_traceback_later()
        log = {"returncode": code, "stdout": stdout, "stderr": stderr}
        (folder / f"{command['name']}.rank{rank}.json").write_text(json.dumps(log))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
