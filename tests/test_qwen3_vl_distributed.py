"""tiny-vl under torchrun (two gloo ranks on CPU, FSDP2) against one process with the same global batch, with the
vision tower frozen and trained: the same final weights, which transformers loads."""

from __future__ import annotations

import pytest
import yaml
from test_distributed import TOWER_RUN, assert_same_weights, ok, run_together, train_args
from transformers import Qwen3VLForConditionalGeneration

pytestmark = pytest.mark.slow

SETTINGS = {
    "model": {"name_or_path": "tiny-vl"},
    "data": {"dataset": "builtin_vision", "builtin": {"tasks": ["colour", "count"], "num_rows": 64},
             "vision_resolution": 32},
    **TOWER_RUN,
}


FREEZE = {"tower_frozen": True, "tower_trained": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both settings in one process, and both on two ranks in one torchrun launch, the launches side by side."""
    base = tmp_path_factory.mktemp("vl_distributed")
    plain, two = {}, {}
    for name, freeze in FREEZE.items():
        config = base / f"{name}.yaml"
        config.write_text(yaml.safe_dump(SETTINGS | {"model": {"name_or_path": "tiny-vl",
                                                               "freeze_vision_tower": freeze}}))
        plain[name] = train_args(config, base / name / "single")
        two[name] = train_args(config, base / name / "two")
    single_logs, two_logs = run_together((None, plain, base / "logs_single"), (2, two, base / "logs_two"))
    return base, single_logs, two_logs


@pytest.mark.parametrize("name", list(FREEZE))
def test_two_ranks_train_the_vl_model_like_one_process(runs, name):
    base, single_logs, two_logs = runs
    ok(single_logs[name]), ok(two_logs[name])
    folder, freeze = base / name, FREEZE[name]
    # Equal to fp32 rounding of gradients summed in another order, which AdamW's division by their root mean
    # square turns into weight differences up to about 1.5e-5 in the tower (its updates are about 4e-3).
    assert_same_weights(folder / "single" / "final", folder / "two" / "final", atol=3e-5)
    start = Qwen3VLForConditionalGeneration.from_pretrained(folder / "single" / "tiny-vl")
    final = Qwen3VLForConditionalGeneration.from_pretrained(folder / "two" / "final")
    tower_moved = any(not (a == b).all() for a, b in zip(start.model.visual.parameters(), final.model.visual.parameters()))
    assert tower_moved != freeze
