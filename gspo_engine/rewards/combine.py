"""Weighted sum of several rewards, each kept and logged on its own, none able to stop the run.

A reward function that raises, returns the wrong number of values, or returns something that is
not a finite number gives 0 to the samples concerned; the failures are counted per reward and the
first one of each reward is logged with its traceback.
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass

from gspo_engine.config import RewardSpec
from gspo_engine.rewards.registry import RewardFn, build_reward

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardBatch:
    """Scores of one batch of completions."""

    total: list[float]  # weighted sum, one per completion
    per_reward: dict[str, list[float]]  # unweighted scores of each reward
    failures: dict[str, int]  # samples each reward failed on in this batch


class CombinedReward:
    def __init__(self, specs: list[RewardSpec]):
        if not specs:
            raise ValueError("at least one reward is needed")
        labels = [spec.label for spec in specs]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"rewards {duplicates} appear twice: give each a distinct `name`")
        for spec in specs:
            if not math.isfinite(spec.weight):
                raise ValueError(f"reward {spec.label!r} has weight {spec.weight}")
        self.specs = list(specs)
        self.functions: list[RewardFn] = [build_reward(spec.function, spec.options) for spec in specs]
        self.failure_counts: dict[str, int] = {label: 0 for label in labels}
        self._logged: set[str] = set()

    def __call__(self, completions: list[str], prompts: list[str], columns: dict[str, list]) -> RewardBatch:
        """`columns`: the dataset's other columns, each a list with one value per completion."""
        count = len(completions)
        if len(prompts) != count:
            raise ValueError(f"{count} completions but {len(prompts)} prompts")
        for column, values in columns.items():
            if len(values) != count:
                raise ValueError(f"column {column!r} has {len(values)} values for {count} completions")
        total = [0.0] * count
        per_reward: dict[str, list[float]] = {}
        failures: dict[str, int] = {}
        for spec, function in zip(self.specs, self.functions):
            scores, failed = self._score(spec.label, function, completions, prompts, columns)
            per_reward[spec.label] = scores
            failures[spec.label] = failed
            self.failure_counts[spec.label] += failed
            total = [acc + spec.weight * score for acc, score in zip(total, scores)]
        return RewardBatch(total, per_reward, failures)

    def _score(self, label: str, function: RewardFn, completions, prompts, columns) -> tuple[list[float], int]:
        count = len(completions)
        try:
            values = list(function(list(completions), list(prompts), **columns))
        except Exception:
            self._log_once(label, f"reward {label!r} raised; its {count} samples get 0:\n{traceback.format_exc()}")
            return [0.0] * count, count
        if len(values) != count:
            self._log_once(label, f"reward {label!r} returned {len(values)} values for {count} completions; all get 0")
            return [0.0] * count, count
        scores = []
        failed = 0
        for index, value in enumerate(values):
            score = _as_finite_float(value)
            if score is None:
                self._log_once(label, f"reward {label!r} returned {value!r} for sample {index}; it gets 0")
                failed += 1
                score = 0.0
            scores.append(score)
        return scores, failed

    def _log_once(self, label: str, message: str) -> None:
        if label not in self._logged:
            self._logged.add(label)
            logger.error("%s (later failures of this reward are only counted)", message)


def _as_finite_float(value) -> float | None:
    # Numbers of any kind (Python, numpy, a one-element tensor) are accepted; strings and None are not.
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def build_rewards(specs: list[RewardSpec]) -> CombinedReward:
    """The run's weighted rewards; without any configured, the built-in tasks' digit_match."""
    return CombinedReward(list(specs) or [RewardSpec(function="digit_match")])
