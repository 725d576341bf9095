"""Data-parallel training under torchrun (gloo on CPU): equivalence with one process, resharded
resume in both directions, export of a sharded checkpoint, and a rank that dies or hangs mid-step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gspo_engine.batching import Sample, equalize_micro_batches
from gspo_engine.config import load_config
from gspo_engine.distributed.sharded_checkpoint import is_sharded_checkpoint
from gspo_engine.config import ConfigError
from gspo_engine.distributed.rules import check_data_parallel

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

pytestmark = pytest.mark.slow

# The embedded MoE with a smaller batch: 8 prompts x 4 completions, 2 minibatches, 2 steps; with the
# KL to a (sharded) reference model, routing replay and activation checkpointing on.
SETTINGS = {
    "model": {"name_or_path": "tiny-moe", "routing_replay": True, "activation_checkpointing": True},
    "data": {"builtin": {"tasks": ["copy"], "min_length": 2, "max_length": 3}},
    "rollout": {"prompts_per_step": 8, "group_size": 4, "max_new_tokens": 5},
    "gspo": {"eps_low": 0.2, "eps_high": 0.28, "num_minibatches": 2, "micro_batch_tokens": 64, "beta": 0.05},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 0},
    "train": {"steps": 2, "cpu_threads": 1},
    "checkpoint": {"every": 1, "keep_last": 2},
    "logging": {"every": 1},
}


# The run of the towers' two-rank tests (tests/test_qwen3_vl_distributed.py, test_qwen3_omni_distributed.py):
# 4 prompts x 4 completions of 3 tokens scored by digit_match, 2 minibatches, 2 steps.
TOWER_RUN = {
    "rewards": [{"function": "digit_match"}],
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3},
    "gspo": {"eps_low": 0.2, "eps_high": 0.28, "num_minibatches": 2, "micro_batch_tokens": 64},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 0},
    "train": {"steps": 2, "cpu_threads": 1},
    "logging": {"every": 1},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launcher(ranks: int | None) -> list[str]:
    """Plain Python (ranks None), or torchrun with `ranks` processes, standalone: a free port of its own."""
    launcher = [sys.executable]
    if ranks is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return launcher


def train(config: Path, output: Path, ranks: int | None, *extra: str) -> subprocess.CompletedProcess:
    """`gspo-engine train` in a fresh process: plain (ranks None) or under torchrun with `ranks` processes."""
    command = [*_launcher(ranks), "-m", "gspo_engine", "train", *train_args(config, output, *extra)]
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def train_args(config: Path, output: Path, *extra: str) -> list[str]:
    return ["train", str(config), "--set", f"output_dir={output}", *extra]


# ranks (None: plain); by name, gspo-engine's arguments or {"module": a rank script of tests/, "args": its main's};
# the folder for the logs.
Launch = tuple[int | None, dict[str, list[str] | dict], Path]


def run_together(*launches: Launch) -> list[dict[str, subprocess.CompletedProcess]]:
    """Each launch runs its commands one after another in one process, or in one torchrun process group
    (tests/run_commands.py); the launches run side by side. Every command's exit status and output
    (all ranks' joined) by name, as a process of its own would give them."""
    started = []
    for ranks, commands, logs in launches:
        logs.mkdir(parents=True, exist_ok=True)
        spec = {"folder": str(logs), "timeout_s": TIMEOUT_S,
                "commands": [{"name": name, **(args if isinstance(args, dict) else {"args": args})}
                             for name, args in commands.items()]}
        (logs / "commands.json").write_text(json.dumps(spec))
        started.append(subprocess.Popen([*_launcher(ranks), str(ROOT / "tests" / "run_commands.py"),
                                         str(logs / "commands.json")], cwd=ROOT, env=_env(), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    out = []
    for process, (ranks, commands, logs) in zip(started, launches):
        try:  # a command that hangs ends its launch after TIMEOUT_S; this is the launch's own bound
            stdout, stderr = process.communicate(timeout=TIMEOUT_S * len(commands) + 60)
        except subprocess.TimeoutExpired:
            process.terminate()  # torchrun stops its ranks, which run in sessions of their own
            try:
                stdout, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
        assert process.returncode == 0, f"launch of {list(commands)}: " + stdout[-3000:] + stderr[-6000:]
        results = {}
        for name, args in commands.items():
            logs_of_ranks = [json.loads((logs / f"{name}.rank{rank}.json").read_text()) for rank in range(ranks or 1)]
            code = next((log["returncode"] for log in logs_of_ranks if log["returncode"]), 0)
            results[name] = subprocess.CompletedProcess(args, code, "".join(log["stdout"] for log in logs_of_ranks),
                                                        "".join(log["stderr"] for log in logs_of_ranks))
        out.append(results)
    return out


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}: " + result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Equal to fp32 rounding: the sums run in another order, and AdamW divides by the gradients' size
    (updates here move weights by about 4e-3; rounding differences stay below 3e-6)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)


def resume_from(checkpoint: Path, run: Path) -> None:
    """A new run folder holding `checkpoint` (and the tiny model it started from), for --resume."""
    import shutil

    run.mkdir(parents=True)
    shutil.copytree(checkpoint, run / checkpoint.name)
    shutil.copytree(checkpoint.parent / "tiny-moe", run / "tiny-moe")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, one rank and two ranks under torchrun train the same 2 steps; then their checkpoints
    resume across those layouts and export. Runs that need the same number of processes share a launch."""
    base = tmp_path_factory.mktemp("distributed")
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    out = {name: base / name for name in ("single", "one", "two", "resumed_from_two", "resumed_from_one",
                                          "from_single", "hf")}
    out["config"] = config
    single, one, two = run_together(
        (None, {"single": train_args(config, out["single"])}, base / "logs_plain"),
        (1, {"one": train_args(config, out["one"])}, base / "logs_one"),
        (2, {"two": train_args(config, out["two"])}, base / "logs_two"),
    )
    ok(single["single"]), ok(one["one"])
    out["two_log"] = ok(two["two"])
    resume_from(out["two"] / "checkpoint-1", out["resumed_from_two"])
    resume_from(out["one"] / "checkpoint-1", out["resumed_from_one"])
    resume_from(out["single"] / "checkpoint-1", out["from_single"])
    plain, two_ranks = run_together(
        (None, {"resumed_from_two": train_args(config, out["resumed_from_two"], "--resume"),
                "export": ["export", str(out["two"] / "checkpoint-1"), "--output", str(out["hf"])]},
         base / "logs_plain_after"),
        (2, {"resumed_from_one": train_args(config, out["resumed_from_one"], "--resume"),
             "from_single": train_args(config, out["from_single"], "--resume")}, base / "logs_two_after"),
    )
    out["logs"] = plain | two_ranks
    return out


def test_two_ranks_match_one_process_with_the_same_global_batch(runs):
    single, two = metrics(runs["single"]), metrics(runs["two"])
    assert len(single) == len(two) == 2
    for a, b in zip(single, two):
        assert a["reward_mean"] == b["reward_mean"]  # the same completions were sampled
        for key in ("loss", "grad_norm", "ratio_mean", "clip_frac", "kl", "response_len_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert_same_weights(runs["single"] / "final", runs["two"] / "final")
    # The weights moved: the comparison is not between two untouched copies.
    start, end = weights(runs["single"] / "tiny-moe"), weights(runs["single"] / "final")
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 1e-4
    assert "x 2 ranks (FSDP2)" in runs["two_log"].stdout


def test_distributed_checkpoints_are_sharded_and_the_final_model_loads_in_transformers(runs):
    from transformers import AutoModelForCausalLM

    checkpoint = runs["two"] / "checkpoint-1"
    assert is_sharded_checkpoint(checkpoint)
    assert not (checkpoint / "model.safetensors").exists()
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2  # one file per rank
    model = AutoModelForCausalLM.from_pretrained(runs["two"] / "final")
    final = weights(runs["two"] / "final")
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), final["model.embed_tokens.weight"])


def test_a_two_rank_checkpoint_resumes_on_one_process(runs):
    run = runs["resumed_from_two"]
    result = ok(runs["logs"]["resumed_from_two"])
    assert "resumed from" in result.stdout and "at step 1" in result.stdout
    assert_same_weights(runs["single"] / "final", run / "final")
    assert metrics(run)[-1]["loss"] == pytest.approx(metrics(runs["single"])[-1]["loss"], rel=1e-5, abs=1e-7)


def test_a_one_rank_checkpoint_resumes_on_two_ranks(runs):
    assert is_sharded_checkpoint(runs["one"] / "checkpoint-1")
    result = ok(runs["logs"]["resumed_from_one"])
    assert "resumed from" in result.stdout and "at step 1" in result.stdout
    assert_same_weights(runs["single"] / "final", runs["resumed_from_one"] / "final")


def test_export_of_a_sharded_checkpoint_loads_in_transformers(runs):
    from transformers import AutoModelForCausalLM

    ok(runs["logs"]["export"])
    out = runs["hf"]
    assert_same_weights(runs["single"] / "checkpoint-1", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    from gspo_engine.hf_checkpoint import load_pretrained

    ours = load_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_a_single_process_checkpoint_is_refused_under_torchrun_with_a_clear_error(runs):
    result = runs["logs"]["from_single"]
    assert result.returncode != 0
    assert "written by a single-process run" in result.stdout + result.stderr
    assert not (runs["from_single"] / "final").exists()


FAULTS = [("die_on_rank_one", "exitcode"), ("hang_on_rank_one", "stopped answering")]


def test_a_rank_that_dies_or_hangs_fails_the_run_and_keeps_the_last_checkpoint(tmp_path):
    """Both faults at once, each in a launch of its own (the hung run mostly waits for its timeout)."""
    from gspo_engine.export import load_sharded_model

    started = {}
    for fault, _ in FAULTS:
        config = tmp_path / f"{fault}.yaml"
        config.write_text(yaml.safe_dump(SETTINGS | {
            "rewards": [{"function": f"rank_faults:{fault}"}],
            "train": {"steps": 3, "cpu_threads": 1},
            "distributed": {"timeout_s": 15},
        }))
        command = [*_launcher(2), "-m", "gspo_engine", *train_args(config, tmp_path / fault)]
        started[fault] = (time.monotonic(), subprocess.Popen(command, cwd=ROOT, env=_env(), text=True,
                                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for fault, message in FAULTS:
        start, process = started[fault]
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        elapsed = time.monotonic() - start
        output = stdout + stderr
        assert process.returncode != 0, fault
        assert message in output, f"{fault}: " + output[-4000:]
        assert elapsed < 120, fault
        run = tmp_path / fault
        assert (run / "checkpoint-1").is_dir() and not (run / "checkpoint-2").exists(), fault
        # The last checkpoint loads: exported whole and read back.
        model = load_sharded_model(run / "checkpoint-1")
        assert all(torch.isfinite(p).all() for p in model.parameters()), fault


def test_the_split_across_ranks_is_checked():
    config = load_config(None, ["rollout.prompts_per_step=6", "rollout.group_size=2", "gspo.num_minibatches=4"])
    check_data_parallel(config, 1)
    check_data_parallel(config, 3)  # 2 prompts x 2 completions per rank = 4 minibatches
    with pytest.raises(ConfigError, match="multiple of the number of ranks"):
        check_data_parallel(config, 4)
    with pytest.raises(ConfigError, match="fewer than gspo.num_minibatches"):
        check_data_parallel(config, 6)
    lora = load_config(None, ["lora.rank=8"])
    with pytest.raises(ConfigError, match="LoRA runs on one process"):
        check_data_parallel(lora, 2)


def _samples(n: int) -> list[Sample]:
    return [Sample(prompt_ids=[1, 2], completion_ids=[3] * (i + 1)) for i in range(n)]


def test_micro_batches_are_split_then_padded_to_the_count_of_the_busiest_rank():
    samples = _samples(5)
    batches = equalize_micro_batches([samples[:4], samples[4:]], 4)
    assert [len(b) for b in batches] == [1, 1, 2, 1]
    assert [s for b in batches for s in b] == samples  # nothing lost, order kept
    padded = equalize_micro_batches([samples[:1]], 3)
    assert padded == [samples[:1], [], []]
    assert equalize_micro_batches([samples], 1) == [samples]
    with pytest.raises(ValueError):
        equalize_micro_batches([samples[:1], samples[1:]], 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fsdp_trains_on_cuda_with_bf16_compute(tmp_path):
    """One rank on the GPU: NCCL, FSDP2 with bf16 gathering and fp32 reduction, sharded checkpoint, final export."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SETTINGS | {"train": {"steps": 2, "device": "cuda", "precision": "bf16-mixed"}}))
    run = tmp_path / "run"
    result = ok(train(config, run, 1))
    assert "on cuda:0 x 1 ranks (FSDP2), precision bf16-mixed" in result.stdout
    records = metrics(run)
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert is_sharded_checkpoint(run / "checkpoint-1")
    start, end = weights(run / "tiny-moe"), weights(run / "final")
    assert max((start[k] - end[k].float()).abs().max().item() for k in start) > 1e-4
