"""The planner on Qwen3-Next-80B-A3B: released shapes, parameter counts, the hybrid KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from gspo_engine.cli import main
from gspo_engine.config import load_config
from gspo_engine.model.hybrid_cache import HybridCache
from gspo_engine.model.kv_cache import KVCache
from gspo_engine.planner import make_plan, plan_model_args

NEXT_YAML = Path(__file__).parent.parent / "configs" / "gspo_qwen3_next.yaml"


def test_plan_of_qwen3_next_80b_from_its_released_shapes():
    config = load_config(NEXT_YAML)
    args, source = plan_model_args(config.model.name_or_path)
    assert "released Qwen3-Next-80B-A3B-Instruct" in source
    assert len(args.linear_attention_layers) == 36 and args.rotary_dim == 64
    plan = make_plan(config, gpus=16, gpu_memory_gb=141)
    assert plan.architecture == "Qwen3NextForCausalLM"
    assert round(plan.total_params / 1e9, 2) == 79.67  # 80B
    assert round(plan.active_params / 1e9, 2) == 3.87  # A3B: 10 of 512 experts, the shared expert, attention
    # The rollout's cache: keys and values of the 12 full-attention layers, fixed-size states of the 36 others.
    rollout = plan.memory.rollout
    cache = KVCache.allocate(args, rollout.concurrency, rollout.columns, torch.bfloat16, torch.device("meta"))
    assert isinstance(cache, HybridCache) and len(cache.keys) == 12 and len(cache.recurrent) == 36
    assert rollout.kv_cache == cache.nbytes


def test_plan_command_prints_the_qwen3_next_plan():
    result = CliRunner().invoke(main, ["plan", str(NEXT_YAML), "--gpus", "16", "--gpu-memory-gb", "141"])
    assert result.exit_code == 0, result.output
    assert "(Qwen3NextForCausalLM)" in result.output
    assert "79.67B total, 3.87B active per token" in result.output
    assert "training peak" in result.output
