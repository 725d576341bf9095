"""The planner on Qwen3-Next-80B-A3B: released shapes, parameter counts, the hybrid KV cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import gspo_engine.model.gated_deltanet as gated_deltanet
from gspo_engine.cli import main
from gspo_engine.config import config_from_dict, load_config
from gspo_engine.model.args import QWEN3_5_ARCHITECTURE
from gspo_engine.model.hybrid_cache import HybridCache
from gspo_engine.model.kv_cache import KVCache
from gspo_engine.model.qwen3_next import HybridBlock
from gspo_engine.model.rope import rotary_cos_sin
from gspo_engine.planner import make_plan, plan_model_args
from gspo_engine.planner.activations import (
    hybrid_block_activation_bytes,
    linear_attention_kernel_bytes,
    resolve_compute,
)
from gspo_engine.tiny import tiny_model_args

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


@pytest.mark.parametrize("model", ["tiny-next", "qwen3.5-dense"])
@pytest.mark.parametrize("layer", [0, 1], ids=["linear", "full"])
@pytest.mark.parametrize("regime", ["fp32", "autocast over fp32 weights", "bf16 weights (FSDP2)"])
def test_hybrid_block_bytes_are_what_autograd_saves(model, layer, regime, monkeypatch):
    """hybrid_block_activation_bytes against the tensors one block saves for its backward, per token; the delta
    rule's and the convolution's own are flash-linear-attention's on CUDA and are left out on both sides."""
    args = tiny_model_args("tiny-next")
    if model == "qwen3.5-dense":  # split projections, a dense MLP
        args = dataclasses.replace(args, hf_architecture=QWEN3_5_ARCHITECTURE, num_experts=0)
    bf16_weights = regime.startswith("bf16")
    precision = "fp32" if regime == "fp32" else "bf16-mixed"
    compute = resolve_compute(config_from_dict({"train": {"precision": precision}}), 2 if bf16_weights else 1)
    inside_kernel = [False]

    def left_out(function):
        def run(*arguments, **options):
            inside_kernel[0] = True
            try:
                return function(*arguments, **options)
            finally:
                inside_kernel[0] = False
        return run

    monkeypatch.setattr(gated_deltanet, "gated_delta_rule", left_out(gated_deltanet.gated_delta_rule))
    monkeypatch.setattr(gated_deltanet, "causal_conv1d", left_out(gated_deltanet.causal_conv1d))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    block = HybridBlock(args, layer).to(dtype)
    batch, seq = 7, 128  # 896 tokens, whole chunks of the rule; no weight's size is a multiple of it
    tokens = batch * seq
    x = torch.randn(batch, seq, args.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = rotary_cos_sin(args, torch.arange(seq)[None], dtype)
    saved = {}

    def pack(tensor):
        if not inside_kernel[0] and tensor.numel() % tokens == 0:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            _, routing = block(x, cos, sin, None, None, None)
    measured = sum(saved.values())
    cpu_only = 0
    if routing is not None:
        measured += routing.router_logits.untyped_storage().nbytes()
        cpu_only = 8 * (args.num_experts - args.num_experts_per_tok) * tokens  # the PyTorch routing's full sort
    estimate = hybrid_block_activation_bytes(args, compute, layer)
    if args.is_linear_attention_layer(layer):
        estimate -= linear_attention_kernel_bytes(args, compute)
    assert measured == pytest.approx(estimate * tokens + cpu_only, rel=0.02)
