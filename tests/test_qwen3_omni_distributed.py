"""tiny-omni under torchrun (two gloo ranks on CPU, FSDP2) against one process with the same global batch: the same
final weights, both towers unchanged, and a final folder transformers loads as the full Omni model."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_distributed import TOWER_RUN, assert_same_weights, ok, run_together, train_args, weights
from transformers import Qwen3OmniMoeForConditionalGeneration

pytestmark = pytest.mark.slow

SETTINGS = {
    "model": {"name_or_path": "tiny-omni", "freeze_vision_tower": True},
    "data": {"dataset": "builtin_audio", "builtin": {"tasks": ["pitch"], "num_rows": 64}, "max_audio_seconds": 2},
    **TOWER_RUN,
}


def test_two_ranks_train_the_omni_thinker_like_one_process(tmp_path):
    config = tmp_path / "omni.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    single, two = tmp_path / "single", tmp_path / "two"
    single_logs, two_logs = run_together((None, {"omni": train_args(config, single)}, tmp_path / "logs_single"),
                                         (2, {"omni": train_args(config, two)}, tmp_path / "logs_two"))
    ok(single_logs["omni"]), ok(two_logs["omni"])
    assert_same_weights(single / "final", two / "final", atol=3e-5)
    start, final = weights(single / "tiny-omni"), weights(two / "final")
    towers = [key for key in start if ".audio_tower." in key or ".visual." in key]
    assert towers and all(torch.equal(start[key], final[key]) for key in towers)
    assert any(not torch.equal(start[key], final[key]) for key in start if ".layers." in key and key not in towers)
    Qwen3OmniMoeForConditionalGeneration.from_pretrained(two / "final")
