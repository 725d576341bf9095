"""Rewards: the TRL-style function signature, the registry, the weighted combination, the built-ins."""

from gspo_engine.config import RewardSpec

# Importing the built-in reward modules registers them.
from gspo_engine.rewards import code_tests, digit_match, exact_match, format_regex, math_answer  # noqa: F401
from gspo_engine.rewards.combine import CombinedReward, RewardBatch, build_rewards
from gspo_engine.rewards.registry import REWARDS, RewardFn, build_reward, register_reward, resolve_reward
from gspo_engine.rewards.sandbox import Sandbox, SandboxLimits, SandboxResult, plan_tests

__all__ = [
    "REWARDS", "CombinedReward", "RewardBatch", "RewardFn", "RewardSpec", "Sandbox", "SandboxLimits",
    "SandboxResult", "build_reward", "build_rewards", "plan_tests", "register_reward", "resolve_reward",
]
