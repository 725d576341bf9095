"""Several `gspo-engine` command lines (train, export) run one after another in one process, plain or under
torchrun, for the distributed tests: a launch pays process start-up, imports and the process group once for
all of them. Each command's output and exit status go to files of their own, as a separate run's would.
A command may instead name a rank script of tests/ ("module": its main(*args) runs in the same process group).

    python tests/run_commands.py COMMANDS.json
    torchrun --nproc_per_node N tests/run_commands.py COMMANDS.json

COMMANDS.json: {"folder": LOGS, "commands": [{"name": NAME, "args": [...]}, ...]}, args as given to
gspo-engine (or to the main of "module"). Every rank writes LOGS/NAME.rankR.json: {"returncode", "stdout", "stderr"}. Every run seeds
itself from its config, so what it computes does not depend on the runs before it in the process.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

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
    for command in spec["commands"]:
        code, stdout, stderr = run(command["args"], command.get("module"))
        log = {"returncode": code, "stdout": stdout, "stderr": stderr}
        (folder / f"{command['name']}.rank{rank}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main(sys.argv[1])
