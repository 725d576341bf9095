"""Advantages, batching and the learning-rate schedule of the trainer."""

import math

import pytest
import torch

from gspo_engine.advantages import group_advantages
from gspo_engine.batching import Sample, collate, split_micro_batches, split_minibatches
from gspo_engine.config import OptimConfig
from gspo_engine.optim import lr_factor


def test_group_advantages_follow_equation_6():
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    result = group_advantages(rewards, group_size=4, scale="group", eps=1e-6)
    first = rewards[:4]
    want = (first - first.mean()) / (first.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(result.values[:4], want)
    assert torch.equal(result.values[4:], torch.zeros(4))
    assert result.constant_groups == 1


def test_batch_and_no_scaling():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    torch.testing.assert_close(group_advantages(rewards, 2, scale="none").values, centred)
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale="batch", eps=0.0).values, centred / centred.std(unbiased=False)
    )
    with pytest.raises(ValueError, match="G = 3"):
        group_advantages(rewards, 3)


def test_collate_marks_only_completion_targets():
    samples = [Sample([5, 6, 7], [8, 9]), Sample([5], [1, 2, 3, 4])]
    batch = collate(samples, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 1, 2, 3]]
    assert batch.targets.tolist() == [[6, 7, 8, 9], [1, 2, 3, 4]]
    assert batch.mask.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert batch.targets[batch.mask].tolist() == [8, 9, 1, 2, 3, 4]
    values = batch.scatter([torch.tensor([0.5, 0.25]), torch.tensor([1.0, 2.0, 3.0, 4.0])])
    assert values[batch.mask].tolist() == [0.5, 0.25, 1.0, 2.0, 3.0, 4.0]


def test_minibatches_cover_every_sample_once():
    samples = [Sample([1], [2] * n) for n in range(1, 11)]
    parts = split_minibatches(samples, 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert [s for p in parts for s in p] == samples


@pytest.mark.parametrize("budget", [1, 7, 16, 1000])
def test_micro_batches_respect_the_token_budget(budget):
    samples = [Sample([1, 2], [3] * n) for n in (1, 5, 2, 9, 3, 3)]
    parts = split_micro_batches(samples, budget)
    assert [s for p in parts for s in p] == samples
    for part in parts:
        assert len(part) == 1 or len(part) * max(s.num_positions for s in part) <= budget


def test_learning_rate_schedule():
    cosine = OptimConfig(learning_rate=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, 12, cosine) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 12, cosine) == pytest.approx(1.0)
    assert lr_factor(7, 12, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(12, 12, cosine) == pytest.approx(0.1)
    assert lr_factor(50, 12, OptimConfig(schedule="constant")) == 1.0
