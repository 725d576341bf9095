"""Data-parallel training under torchrun (gloo on CPU): equivalence with one process, resharded
resume in both directions, export of a sharded checkpoint, and a rank that dies or hangs mid-step."""

from __future__ import annotations

import json
import os
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


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def train(config: Path, output: Path, ranks: int | None, *extra: str) -> subprocess.CompletedProcess:
    """`gspo-engine train` in a fresh process: plain (ranks None) or under torchrun with `ranks` processes."""
    launcher = [sys.executable]
    if ranks is not None:  # torchrun, standalone: a free port of its own on this machine
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command = [*launcher, "-m", "gspo_engine", "train", str(config), "--set", f"output_dir={output}", *extra]
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
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
    base = tmp_path_factory.mktemp("distributed")
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    out = {"config": config, "base": base}
    out["single"] = base / "single"
    ok(train(config, out["single"], None))
    out["two"] = base / "two"
    out["two_log"] = ok(train(config, out["two"], 2))
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


def test_a_two_rank_checkpoint_resumes_on_one_process(runs, tmp_path):
    run = tmp_path / "resumed"
    resume_from(runs["two"] / "checkpoint-1", run)
    result = ok(train(runs["config"], run, None, "--resume"))
    assert "resumed from" in result.stdout and "at step 1" in result.stdout
    assert_same_weights(runs["single"] / "final", run / "final")
    assert metrics(run)[-1]["loss"] == pytest.approx(metrics(runs["single"])[-1]["loss"], rel=1e-5, abs=1e-7)


def test_a_one_rank_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    one = tmp_path / "one"
    ok(train(runs["config"], one, 1))
    assert is_sharded_checkpoint(one / "checkpoint-1")
    run = tmp_path / "resumed"
    resume_from(one / "checkpoint-1", run)
    ok(train(runs["config"], run, 2, "--resume"))
    assert_same_weights(runs["single"] / "final", run / "final")


def test_export_of_a_sharded_checkpoint_loads_in_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "gspo_engine", "export", str(runs["two"] / "checkpoint-1"), "--output", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    ok(result)
    assert_same_weights(runs["single"] / "checkpoint-1", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    from gspo_engine.hf_checkpoint import load_pretrained

    ours = load_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_a_single_process_checkpoint_is_refused_under_torchrun_with_a_clear_error(runs, tmp_path):
    run = tmp_path / "from_single"
    resume_from(runs["single"] / "checkpoint-1", run)
    result = train(runs["config"], run, 2, "--resume")
    assert result.returncode != 0
    assert "written by a single-process run" in result.stdout + result.stderr


@pytest.mark.parametrize("fault, message", [
    ("die_on_rank_one", "exitcode"),
    ("hang_on_rank_one", "stopped answering"),
])
def test_a_rank_that_dies_or_hangs_fails_the_run_and_keeps_the_last_checkpoint(runs, tmp_path, fault, message):
    config = tmp_path / "faulty.yaml"
    config.write_text(yaml.safe_dump(SETTINGS | {
        "rewards": [{"function": f"rank_faults:{fault}"}],
        "train": {"steps": 3, "cpu_threads": 1},
        "distributed": {"timeout_s": 15},
    }))
    run = tmp_path / "run"
    start = time.monotonic()
    result = train(config, run, 2)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-4000:]
    assert elapsed < 120
    assert (run / "checkpoint-1").is_dir() and not (run / "checkpoint-2").exists()
    # The last checkpoint loads: exported whole and read back.
    from gspo_engine.export import load_sharded_model

    model = load_sharded_model(run / "checkpoint-1")
    assert all(torch.isfinite(p).all() for p in model.parameters())


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
