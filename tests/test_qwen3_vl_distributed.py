"""tiny-vl under torchrun (two gloo ranks on CPU, FSDP2) against one process with the same global batch, with the
vision tower frozen and trained: the same final weights, which transformers loads."""

from __future__ import annotations

import pytest
import yaml
from test_distributed import assert_same_weights, ok, train
from transformers import Qwen3VLForConditionalGeneration

pytestmark = pytest.mark.slow

SETTINGS = {
    "model": {"name_or_path": "tiny-vl"},
    "data": {"dataset": "builtin_vision", "builtin": {"tasks": ["colour", "count"], "num_rows": 64},
             "vision_resolution": 32},
    "rewards": [{"function": "digit_match"}],
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3},
    "gspo": {"eps_low": 0.2, "eps_high": 0.28, "num_minibatches": 2, "micro_batch_tokens": 64},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 0},
    "train": {"steps": 2, "cpu_threads": 1},
    "logging": {"every": 1},
}


@pytest.mark.parametrize("freeze", [True, False], ids=["tower_frozen", "tower_trained"])
def test_two_ranks_train_the_vl_model_like_one_process(tmp_path, freeze):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SETTINGS | {"model": {"name_or_path": "tiny-vl", "freeze_vision_tower": freeze}}))
    ok(train(config, tmp_path / "single", None))
    ok(train(config, tmp_path / "two", 2))
    # Equal to fp32 rounding of gradients summed in another order, which AdamW's division by their root mean
    # square turns into weight differences up to about 1.5e-5 in the tower (its updates are about 4e-3).
    assert_same_weights(tmp_path / "single" / "final", tmp_path / "two" / "final", atol=3e-5)
    start = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "single" / "tiny-vl")
    final = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "two" / "final")
    tower_moved = any(not (a == b).all() for a, b in zip(start.model.visual.parameters(), final.model.visual.parameters()))
    assert tower_moved != freeze
