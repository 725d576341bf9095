"""`digit_match`: the partial-credit reward of the built-in digit tasks (gspo_engine/builtin_tasks.py).

It gives credit per digit and for the length, which a tiny randomly initialised model can climb by
small steps: stop at the right length and emit the prompt's digits, then put them in the right places.
"""

from __future__ import annotations

from collections import Counter

from gspo_engine.rewards.registry import register_reward


@register_reward("digit_match")
def digit_match(completions: list[str], prompts: list[str], *, answer: list[str], **_columns) -> list[float]:
    """A third each for digits in the right place, the right digits in any order, and the right
    length, all over the longer of answer and completion (so extra characters cost); 1 only for
    the exact answer. The length third makes stopping on time pay before the digits are right."""
    scores = []
    for completion, expected in zip(completions, answer):
        predicted = "".join(completion.split())
        expected = str(expected)
        longest = max(len(predicted), len(expected))
        if longest == 0:
            scores.append(1.0)
            continue
        in_place = sum(p == e for p, e in zip(predicted, expected))
        in_common = sum((Counter(predicted) & Counter(expected)).values())
        shortest = min(len(predicted), len(expected))
        scores.append((in_place + in_common + shortest) / (3 * longest))
    return scores
