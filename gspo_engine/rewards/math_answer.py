"""`math`: 1 when the completion's final answer is mathematically equal to the `answer` column.

Uses math-verify (the library TRL's accuracy reward uses): it parses LaTeX and plain expressions,
prefers the last \\boxed{} answer, and compares symbolically. Its timeouts rely on SIGALRM, which
only the main thread may use, so in other threads it runs without them.
"""

from __future__ import annotations

import threading

from gspo_engine.rewards.registry import register_reward
from gspo_engine.rewards.text import strip_thinking


def _math_verify():
    try:
        import math_verify
    except ImportError as error:
        raise ImportError(
            "the `math` reward needs the math-verify library: pip install math-verify"
        ) from error
    return math_verify


@register_reward("math")
def math_answer(completions: list[str], prompts: list[str], *, answer: list, **_columns) -> list[float]:
    math_verify = _math_verify()
    timeout_s = 5 if threading.current_thread() is threading.main_thread() else None
    scores = []
    for completion, expected in zip(completions, answer):
        gold = math_verify.parse(str(expected), extraction_mode="first_match", parsing_timeout=timeout_s)
        if not gold:
            # A data problem, not the model's: NaN makes the combiner count and report it.
            scores.append(float("nan"))
            continue
        predicted = math_verify.parse(strip_thinking(completion), parsing_timeout=timeout_s)
        scores.append(float(bool(predicted) and math_verify.verify(gold, predicted, timeout_seconds=timeout_s)))
    return scores
