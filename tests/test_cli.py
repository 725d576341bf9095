"""The gspo-engine command line: train flags, --dry-run on every shipped config, generate."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gspo_engine import __version__
from gspo_engine.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
TINY = Path(__file__).parent.parent / "configs" / "tiny-moe.yaml"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_there_are_configs():
    names = {path.name for path in CONFIGS}
    assert {"tiny-moe.yaml", "tiny-dense.yaml", "moe.yaml", "gspo_qwen3_4b_nano.yaml", "gspo_qwen3_coder.yaml",
            "gspo_qwen3_235b_a22b.yaml"} <= names


def test_a_renamed_config_still_works_under_its_old_name(prompts_file):
    old = CONFIGS[0].parent / "gspo_qwen3_moe.yaml"
    result = CliRunner().invoke(main, ["train", str(old), "--dry-run", "--dataset", str(prompts_file)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "is now" in result.output and "gspo_qwen3_235b_a22b.yaml" in result.output
    assert "Qwen3-235B-A22B" in result.output


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 2 + 2?", "answer": "4"}\n')
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_config_passes_dry_run(config, prompts_file):
    # A dry run checks that the dataset exists: the shipped configs name files users bring.
    builtin = yaml.safe_load(config.read_text()).get("data", {}).get("dataset", "builtin") == "builtin"
    result = invoke("train", config, "--dry-run", *([] if builtin else ["--dataset", prompts_file]))
    assert result.exit_code == 0, result.output
    assert "plan:" in result.output and "parameters:" in result.output


def test_a_dry_run_without_the_dataset_prints_the_plan_and_then_fails_naming_it():
    """The seed's Qwen3-4B command as written: its config names a prompts file users bring."""
    result = invoke("train", "--stage", "gspo", "--config", TINY.parent / "gspo_qwen3_4b_nano.yaml",
                    "--gspo_group_size", 16, "--learning_rate", "3e-5", "--cutoff_len", 2048, "--lora_rank", 16,
                    "--dry-run", "--gpus", 1, "--gpu-memory-gb", 80)
    assert result.exit_code == 1
    assert "rollout peak" in result.output and "training peak" in result.output
    assert "data.dataset: dataset file data/math.jsonl does not exist" in result.output.splitlines()[-1]


def test_familiar_flags_map_onto_the_config():
    result = invoke("train", "--config", TINY, "--dry-run", "--gspo_group_size", 12, "--learning_rate", "2e-5",
                    "--output_dir", "somewhere", "--cutoff_len", 300, "--set", "train.steps=7")
    assert result.exit_code == 0, result.output
    for line in ("group_size: 12", "learning_rate: 2.0e-05", "output_dir: somewhere", "max_prompt_tokens: 300",
                 "steps: 7"):
        assert line in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora_rank", "-1"], "lora.rank: -1 is not valid"),
        (["--stage", "dpo"], "the only stage is gspo"),
        (["--set", "gspo.level=tokens"], "gspo.level: 'tokens' is not valid"),
        (["--set", "nonsense"], "section.key=value"),
        (["--model_name_or_path", "/nowhere/model"], "has no config.json"),
    ],
)
def test_bad_train_invocations_say_why(args, message):
    result = CliRunner().invoke(main, ["train", str(TINY), "--dry-run", *args])
    assert result.exit_code != 0
    assert message in result.output


def test_train_and_generate_on_the_tiny_model(tmp_path):
    result = invoke("train", TINY, "--set", "train.steps=2", "--set", "rollout.prompts_per_step=2",
                    "--set", "rollout.group_size=2", "--set", "gspo.num_minibatches=1", "--output_dir", tmp_path)
    assert result.exit_code == 0, result.output
    assert "done: 2 steps" in result.output
    final = tmp_path / "final"
    result = invoke("generate", final, "--prompt", "<copy>12=", "--temperature", 0, "--max-new-tokens", 3)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("[0] '<copy>12=' -> ")
