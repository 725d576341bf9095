"""The planner's rollout under a KV cache budget: the concurrency it implies, the decode steps it costs, what
--dry-run says, and the seed's Qwen3-4B configurations on 80, 24, 16 and 141 GB cards."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gspo_engine.cli import main
from gspo_engine.config import load_config
from gspo_engine.model.kv_cache import slot_bytes
from gspo_engine.planner import make_plan, plan_model_args
from gspo_engine.planner.rollout_budget import rollout_kv_cache_gb

CONFIGS = Path(__file__).parent.parent / "configs"
NANO = CONFIGS / "gspo_qwen3_4b_nano.yaml"
# The seed's command: --gspo_group_size 16 --learning_rate 3e-5 --cutoff_len 2048 (max_prompt_tokens).
SEED_FLAGS = ["rollout.group_size=16", "optim.learning_rate=3e-5", "data.max_prompt_tokens=2048"]
LORA = ["lora.rank=16"]


def nano_plan(extra: list[str], gpu_memory_gb: float):
    return make_plan(load_config(NANO, SEED_FLAGS + extra), gpus=1, gpu_memory_gb=gpu_memory_gb).memory


def test_a_budget_sets_the_concurrency_and_the_cache():
    args, _ = plan_model_args("models/Qwen3-4B-Instruct-2507")
    unbounded = nano_plan(LORA, 141).rollout
    assert not unbounded.reduced and unbounded.concurrency == unbounded.sequences == 128
    assert unbounded.decode_steps == 1024
    per_slot = slot_bytes(args, 2048 + 1024 - 1, torch.bfloat16)
    budgeted = nano_plan(LORA + ["rollout.kv_cache_gb=10"], 141).rollout
    assert budgeted.concurrency == int(10e9 // per_slot) == 22
    assert budgeted.kv_cache == 22 * per_slot and budgeted.reduced
    assert budgeted.decode_steps == 6 * 1024  # 128 sequences in waves of 22, each of up to 1024 steps
    assert budgeted.sampling < unbounded.sampling


def test_without_a_budget_the_cache_takes_what_fits():
    memory = nano_plan(LORA, 80)
    rollout = memory.rollout
    assert rollout.reduced and 1 < rollout.concurrency < 128
    assert memory.rollout_fits
    # One more sequence at once would not fit.
    more = nano_plan(LORA + [f"rollout.kv_cache_gb={(rollout.concurrency + 1.5) * rollout.slot_bytes / 1e9}"], 80)
    assert more.rollout.concurrency == rollout.concurrency + 1 and not more.rollout_fits


@pytest.mark.parametrize(
    "extra, gpu_memory_gb",
    [
        (LORA, 80),  # the seed's command on one 80 GB card
        (LORA + ["lora.base_bf16=true"], 24),  # with a bf16 frozen base on a 24 GB card
        (LORA + ["lora.base_bf16=true", "gspo.micro_batch_tokens=8192"], 16),  # what fits 16 GB
        ([], 141),  # full fine-tuning on one H200
    ],
    ids=["lora-80gb", "lora-bf16-base-24gb", "lora-bf16-base-16gb", "full-h200"],
)
def test_the_seed_nano_configurations_fit(extra, gpu_memory_gb):
    memory = nano_plan(extra, gpu_memory_gb)
    assert memory.rollout_fits and memory.training_fits, (memory.rollout_peak, memory.training_peak, memory.usable)


def test_16_gb_needs_smaller_micro_batches_and_the_plan_says_which(tmp_path):
    memory = nano_plan(LORA + ["lora.base_bf16=true"], 16)
    assert not memory.training_fits and memory.rollout_fits
    assert memory.largest is not None and memory.largest.micro.budget == 8192
    # With the fp32 base nothing fits: the plan names the bf16 base, then the micro-batch.
    command = ["plan", str(NANO), "--gpu-memory-gb", "16", *[f"--set={o}" for o in SEED_FLAGS + LORA]]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert "lora.base_bf16: true (under bf16-mixed) stores the frozen base in bf16" in result.output
    bf16 = CliRunner().invoke(main, command + ["--set=lora.base_bf16=true"])
    assert "largest micro-batch that fits: micro_batch_tokens 8,192" in bf16.output
    assert "the configured 16,384 does not fit" in bf16.output


def test_dry_run_says_when_the_concurrency_is_reduced(tmp_path):
    prompts = tmp_path / "math.jsonl"
    prompts.write_text('{"prompt": "What is 2 + 2?", "answer": "4"}\n')
    command = ["train", "--stage", "gspo", "--config", str(NANO), "--gspo_group_size", "16", "--learning_rate", "3e-5",
               "--cutoff_len", "2048", "--lora_rank", "16", "--dry-run", "--dataset", str(prompts)]
    result = CliRunner().invoke(main, command + ["--gpu-memory-gb", "80"])
    assert result.exit_code == 0, result.output
    assert "concurrency REDUCED: " in result.output and "of 128 sequences at once" in result.output
    assert "decode steps instead of 1,024" in result.output
    assert "rollout peak (gradients freed):" in result.output and "DOES NOT FIT" not in result.output
    roomy = CliRunner().invoke(main, command + ["--gpu-memory-gb", "141"])
    assert "concurrency: all 128 sequences at once" in roomy.output


def test_a_run_decodes_under_the_configured_or_the_planned_budget(tmp_path):
    config = load_config(CONFIGS / "tiny-moe.yaml")
    assert rollout_kv_cache_gb(config, 1, "tiny-moe") is None  # a CPU with the host's memory holds them all
    config = load_config(CONFIGS / "tiny-moe.yaml", ["rollout.kv_cache_gb=0.5"])
    assert rollout_kv_cache_gb(config, 1, "tiny-moe") == 0.5
