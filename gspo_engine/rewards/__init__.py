"""Rewards: the TRL-style function signature, the registry, the weighted combination, the built-ins."""

# Importing the built-in reward modules registers them.
from gspo_engine.rewards import code_tests, exact_match, format_regex, math_answer, tiny_tasks  # noqa: F401
from gspo_engine.rewards.combine import CombinedReward, RewardBatch, RewardSpec
from gspo_engine.rewards.registry import REWARDS, RewardFn, build_reward, register_reward, resolve_reward
from gspo_engine.rewards.sandbox import Sandbox, SandboxLimits, SandboxResult, plan_tests

__all__ = [
    "REWARDS", "CombinedReward", "RewardBatch", "RewardFn", "RewardSpec", "Sandbox", "SandboxLimits",
    "SandboxResult", "build_reward", "plan_tests", "register_reward", "resolve_reward",
]
