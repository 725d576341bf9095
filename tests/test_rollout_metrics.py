"""The rollout's concurrency and KV cache use in a step's metrics: per rank from Generation, across ranks,
and on the console line."""

from gspo_engine.metrics import console_line
from gspo_engine.step_metrics import RankShare, combine_ranks


def share(active_mean: float, active_min: int, kv_cache_mib: float, kv_cache_use: float) -> dict:
    return RankShare(
        rewards=[0.0, 1.0], per_reward={}, failures=0, constant_groups=0, rollout_tokens=10, update_tokens=20,
        finished=1, rollout_s=1.0, update_s=1.0, step_s=2.0, peak_memory_mib=1.0, rollout_active_mean=active_mean,
        rollout_active_min=active_min, kv_cache_mib=kv_cache_mib, kv_cache_use=kv_cache_use,
    ).as_dict()


def test_ranks_combine_into_per_gpu_concurrency():
    record = combine_ranks([share(12.5, 3, 100.0, 0.5), share(7.5, 1, 80.0, 0.25)])
    assert record["rollout_active_mean"] == 10.0  # per GPU: the ranks' mean
    assert record["rollout_active_min"] == 1
    assert record["kv_cache_mib"] == 100.0  # the largest cache of a GPU
    assert record["kv_cache_use"] == 0.375


def test_the_console_line_shows_concurrency_and_cache_use():
    line = console_line(3, combine_ranks([share(12.5, 3, 100.0, 0.5)]))
    assert "active 12.5 | min 3 | kv use 50%" in line
