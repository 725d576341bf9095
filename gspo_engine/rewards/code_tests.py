"""`code`: the fraction of the row's tests that the completion's code passes, run in the sandbox.

The code is the completion's last ```python block (the whole answer when it has none). The
`tests` column holds assert statements or test_* functions (see `plan_tests` for how they count).
A row whose tests cannot be read scores NaN, which the combiner counts as a failure and logs.
"""

from __future__ import annotations

import logging

from gspo_engine.rewards.registry import register_reward
from gspo_engine.rewards.sandbox import Sandbox, SandboxLimits, TestPlan, plan_tests
from gspo_engine.rewards.text import extract_code

logger = logging.getLogger(__name__)


@register_reward("code")
class CodeReward:
    def __init__(
        self,
        timeout_s: float = 10.0,
        cpu_s: int = 10,
        memory_mib: int = 512,
        file_size_mib: int = 16,
        max_processes: int = 16,
        max_workers: int = 4,
    ):
        limits = SandboxLimits(timeout_s, cpu_s, memory_mib, file_size_mib, max_processes)
        self.sandbox = Sandbox(limits, max_workers)

    def __call__(self, completions: list[str], prompts: list[str], *, tests: list, **_columns) -> list[float]:
        plans: list[TestPlan | None] = []
        for index, row_tests in enumerate(tests):
            try:
                plans.append(plan_tests(row_tests))
            except ValueError as error:
                logger.warning("code reward: the tests of sample %d cannot be used: %s", index, error)
                plans.append(None)
        runnable = [index for index, plan in enumerate(plans) if plan is not None]
        results = self.sandbox.run_many(
            [extract_code(completions[index]) for index in runnable], [plans[index] for index in runnable]
        )
        scores = [float("nan")] * len(completions)
        for index, result in zip(runnable, results):
            scores[index] = result.fraction
        return scores
