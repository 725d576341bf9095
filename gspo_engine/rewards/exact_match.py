"""`exact_match`: 1 when the answer after any reasoning block equals the `answer` column, normalised."""

from __future__ import annotations

from gspo_engine.rewards.registry import register_reward
from gspo_engine.rewards.text import normalize_answer, strip_thinking


@register_reward("exact_match")
def exact_match(completions: list[str], prompts: list[str], *, answer: list, **_columns) -> list[float]:
    # A row without an answer is a data problem: NaN makes the combiner count and report it.
    return [
        float("nan") if expected is None
        else float(normalize_answer(strip_thinking(completion)) == normalize_answer(str(expected)))
        for completion, expected in zip(completions, answer)
    ]
