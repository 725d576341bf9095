"""FSDP2 on the tiny Qwen3-Next: two ranks under torchrun (gloo, CPU) against one process."""

from __future__ import annotations

import pytest
import torch
import yaml

from test_distributed import SETTINGS, assert_same_weights, ok, run_together, train_args

pytestmark = pytest.mark.slow


def test_two_ranks_train_the_hybrid_model_like_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    settings = dict(SETTINGS, model=dict(SETTINGS["model"], name_or_path="tiny-next"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    # The one-process run beside the two ranks: it takes one core of its own.
    single, two = run_together((None, {"single": train_args(config, tmp_path / "single")}, tmp_path / "logs_single"),
                               (2, {"two": train_args(config, tmp_path / "two")}, tmp_path / "logs_two"))
    ok(single["single"]), ok(two["two"])
    # Gated DeltaNet, gated attention, shared expert and routed experts, all sharded per block.
    assert_same_weights(tmp_path / "single" / "final", tmp_path / "two" / "final")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").eval()
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5, 12]])).logits).all()
