"""A step's metrics: each rank's share of the step, combined into the metrics of the whole batch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class RankShare:
    """What one rank saw of a step: its rollouts' rewards and lengths, its tokens and its clocks."""

    rewards: list[float]
    per_reward: dict[str, list[float]]  # reward function name -> its score of each sample
    failures: int  # reward calls that raised or returned garbage
    constant_groups: int  # groups whose rewards are all equal (advantage 0)
    rollout_tokens: int
    update_tokens: int  # tokens run through the model in scoring and the update
    finished: int  # completions that ended with eos
    rollout_s: float
    update_s: float
    step_s: float
    peak_memory_mib: float
    # The rollout's concurrency on this rank: sequences decoding per step (mean, min), its KV cache
    # (allocated MiB) and the mean share of the cache's columns running sequences held.
    rollout_active_mean: float = 0.0
    rollout_active_min: int = 0
    kv_cache_mib: float = 0.0
    kv_cache_use: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def combine_ranks(ranks: list[dict]) -> dict:
    """The step's metrics from every rank's RankShare (as dicts, in rank order).

    Counts and tokens add up; a time is the slowest rank's, since ranks wait for each other.
    """
    rewards = torch.tensor([r for rank in ranks for r in rank["rewards"]], dtype=torch.float64)
    per_reward: dict[str, list[float]] = {}
    for rank in ranks:
        for name, values in rank["per_reward"].items():
            per_reward.setdefault(name, []).extend(values)

    def total(key: str) -> float:
        return sum(rank[key] for rank in ranks)

    def slowest(key: str) -> float:
        return max(rank[key] for rank in ranks)

    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        **{f"reward/{name}": sum(values) / len(values) for name, values in per_reward.items()},
        "reward_failures": total("failures"),
        "constant_groups": total("constant_groups"),
        "response_len_mean": total("rollout_tokens") / len(rewards),
        "finished_frac": total("finished") / len(rewards),
        "rollout_s": slowest("rollout_s"),
        "update_s": slowest("update_s"),
        "rollout_tokens_per_s": total("rollout_tokens") / slowest("rollout_s"),
        "update_tokens_per_s": total("update_tokens") / slowest("update_s"),
        "tokens_per_s": (total("rollout_tokens") + total("update_tokens")) / slowest("step_s"),
        "peak_memory_mib": slowest("peak_memory_mib"),
        # Per GPU: each rank decodes its own sequences.
        "rollout_active_mean": total("rollout_active_mean") / len(ranks),
        "rollout_active_min": min(rank["rollout_active_min"] for rank in ranks),
        "kv_cache_mib": slowest("kv_cache_mib"),
        "kv_cache_use": total("kv_cache_use") / len(ranks),
    }
