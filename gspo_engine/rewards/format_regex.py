"""`format`: 1 when the whole completion matches the configured regex (e.g. a think/answer layout)."""

from __future__ import annotations

import re

from gspo_engine.rewards.registry import register_reward


@register_reward("format")
class FormatReward:
    """`pattern` must match the entire completion; `.` matches newlines too."""

    def __init__(self, pattern: str):
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(f"format reward: invalid regex {pattern!r}: {error}") from error

    def __call__(self, completions: list[str], prompts: list[str], **_columns) -> list[float]:
        return [float(self.pattern.fullmatch(completion) is not None) for completion in completions]
