"""Built-in digit tasks for the tiny default model, generated from a seed.

A prompt is `<task>DIGITS=` and the expected completion is the task's answer followed by the eos
token: `<copy>3141=` -> `3141`, `<reverse>3141=` -> `1413`, `<sort>3141=` -> `1134`. Rows are
generated from a seed, so a run can be repeated exactly without a data file. Their reward is
`digit_match` (gspo_engine/rewards/digit_match.py); their tokenizer is the tiny models'
(gspo_engine/tiny.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gspo_engine.config import BUILTIN_TASKS

# The answer to each task of config.BUILTIN_TASKS, from the prompt's digits.
SOLVERS = {
    "copy": lambda digits: digits,
    "reverse": lambda digits: digits[::-1],
    "sort": lambda digits: "".join(sorted(digits)),
}
SEPARATOR = "="


@dataclass(frozen=True)
class TaskConfig:
    """Which tasks, and how hard: string lengths and how many distinct digits appear (2..10)."""

    tasks: tuple[str, ...] = BUILTIN_TASKS
    min_length: int = 2
    max_length: int = 4
    num_digits: int = 10

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(BUILTIN_TASKS))
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be some of {sorted(BUILTIN_TASKS)}, got {list(self.tasks)}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if not 2 <= self.num_digits <= 10:
            raise ValueError(f"num_digits must be in 2..10, got {self.num_digits}")


def task_prompt(task: str, digits: str) -> str:
    return f"<{task}>{digits}{SEPARATOR}"


def generate_task_rows(config: TaskConfig, count: int, seed: int) -> list[dict]:
    """`count` rows `{"prompt", "answer", "task"}`, the same for the same config and seed."""
    rng = random.Random(seed)
    alphabet = "0123456789"[: config.num_digits]
    rows = []
    for _ in range(count):
        task = rng.choice(config.tasks)
        digits = "".join(rng.choices(alphabet, k=rng.randint(config.min_length, config.max_length)))
        rows.append({"prompt": task_prompt(task, digits), "answer": SOLVERS[task](digits), "task": task})
    return rows
