"""What a user runs into: nothing they wrote is deleted or overwritten unless they say so, and
every mistake gets a message instead of a traceback."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gspo_engine.cli import main
from gspo_engine.metrics import TrainSummary

TINY = Path(__file__).parent.parent / "configs" / "tiny-moe.yaml"
SMALL = ["--set", "train.steps=2", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2",
         "--set", "gspo.num_minibatches=1", "--set", "rollout.max_new_tokens=3"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def train(output_dir, *args):
    return invoke("train", TINY, *SMALL, "--output_dir", output_dir, *args)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run with a checkpoint at step 1."""
    folder = tmp_path_factory.mktemp("nothing_lost") / "run"
    result = train(folder, "--set", "checkpoint.every=1")
    assert result.exit_code == 0, result.output
    return folder


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_overwrites_the_run_it_exports(run):
    before = listing(run)
    for output in (run, run / "final", run.parent):
        result = invoke("export", run, "--output", output, "--force")
        assert result.exit_code != 0 and "choose a folder outside it" in result.output, result.output
    assert listing(run) == before


def test_export_into_a_folder_with_files_needs_force(run, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    result = invoke("export", run, "--output", target)
    assert result.exit_code != 0 and "--force" in result.output and "notes.txt" in result.output
    assert (target / "notes.txt").read_text() == "mine"
    result = invoke("export", run, "--output", target, "--force")
    assert result.exit_code == 0, result.output
    assert (target / "config.json").is_file() and not (target / "notes.txt").exists()
    # An export inside the run folder, beside final/, is fine.
    result = invoke("export", run, "--output", run / "exported")
    assert result.exit_code == 0, result.output


def test_an_unfinished_save_is_removed_when_the_run_starts_again(run, tmp_path):
    folder = tmp_path / "killed"
    result = train(folder, "--set", "checkpoint.every=1")
    assert result.exit_code == 0, result.output
    staging = folder / ".checkpoint-2.k3j9x"  # what a SIGKILL during a save leaves
    (staging / "checkpoint").mkdir(parents=True)
    (staging / "checkpoint" / "model.safetensors").write_bytes(b"\0" * 1024)
    result = train(folder, "--resume", "--set", "train.steps=3")
    assert result.exit_code == 0, result.output
    assert not staging.exists() and "unfinished save" in result.output


def test_resume_without_a_checkpoint_says_so_and_touches_nothing(tmp_path):
    folder = tmp_path / "run"
    result = train(folder)  # checkpoint.every is 0 in the tiny config's small form: no checkpoint
    assert result.exit_code == 0, result.output
    before = listing(folder)
    result = train(folder, "--resume")
    assert result.exit_code != 0 and "holds no checkpoint to resume from" in result.output
    assert listing(folder) == before


def test_a_fresh_run_never_overwrites_an_earlier_one_unless_asked(run, tmp_path):
    before = listing(run)
    result = train(run)
    assert result.exit_code != 0 and "holds an earlier run" in result.output and "--overwrite_output_dir" in result.output
    assert listing(run) == before
    copy = tmp_path / "copy"
    assert train(copy).exit_code == 0
    result = train(copy, "--overwrite_output_dir")
    assert result.exit_code == 0, result.output
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 2


def test_output_dir_that_is_a_file_is_a_message(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    result = train(path)
    assert result.exit_code != 0 and "is a file" in result.output
    assert "Traceback" not in result.output and path.read_text() == "x"


def test_dry_run_checks_the_dataset_file(tmp_path):
    reward = ["--set", "rewards=[{function: exact_match}]"]
    result = invoke("train", TINY, "--dry-run", *reward, "--dataset", tmp_path / "missing.jsonl")
    assert result.exit_code != 0 and "missing.jsonl does not exist" in result.output
    bad = tmp_path / "prompts.txt"
    bad.write_text("hello")
    result = invoke("train", TINY, "--dry-run", *reward, "--dataset", bad)
    assert result.exit_code != 0 and "unknown format" in result.output


def test_saved_models_stop_at_eos_in_transformers(run):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    final = run / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    generation = GenerationConfig.from_pretrained(final)
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert tokenizer.eos_token_id in eos
    assert AutoConfig.from_pretrained(final).eos_token_id in eos


def test_train_needs_a_config():
    result = invoke("train", "--dry-run")
    assert result.exit_code != 0 and "give a config" in result.output and "tiny-moe.yaml" in result.output


def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path, monkeypatch):
    from gspo_engine.trainer import GSPOTrainer

    real_step = GSPOTrainer.train_step

    def step_then_interrupt(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(GSPOTrainer, "train_step", step_then_interrupt)
    result = train(tmp_path / "run", "--set", "checkpoint.every=1", "--set", "train.steps=4")
    assert result.exit_code == 130
    assert "interrupted at step 3 of 4" in result.output and "checkpoint-2" in result.output
    assert "--resume" in result.output and "Aborted" not in result.output


def test_summary_of_a_run_that_started_at_reward_zero(tmp_path, monkeypatch):
    from gspo_engine.trainer import GSPOTrainer

    def zero_start(self):
        return TrainSummary(4, 2, 0.0, 0.25, 0, self.output_dir, self.output_dir / "final")

    monkeypatch.setattr(GSPOTrainer, "train", zero_start)
    result = train(tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "(+0.250)" in result.output and "inf" not in result.output


def test_config_yaml_records_what_the_run_used(run):
    used = yaml.safe_load((run / "config.yaml").read_text())
    assert used["train"]["device"] == "cpu" and used["train"]["precision"] == "fp32"
    assert [r["function"] for r in used["rewards"]] == ["digit_match"]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_dry_run_plans_the_machine_the_run_would_use():
    result = invoke("train", TINY, "--dry-run")
    assert result.exit_code == 0, result.output
    # No GPU here: the run computes on the CPU in fp32, and the plan says so instead of assuming a card.
    assert "planned for this machine's CPU" in result.output and "memory per CPU: 1 x" in result.output
    assert "fp32 (train.precision auto on a CPU)" in result.output and "80 GB" not in result.output
    result = invoke("train", TINY, "--dry-run", "--gpus", 2, "--gpu-memory-gb", 40)
    assert result.exit_code == 0, result.output
    assert "planned for 2 x 40 GB GPUs" in result.output and "memory per GPU: 2 x 40 GB" in result.output
    assert "bf16-mixed" in result.output
    assert invoke("train", TINY, "--gpus", 2).exit_code != 0  # planning flags without --dry-run
