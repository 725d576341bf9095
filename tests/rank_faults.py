"""Rewards that make one rank of a torchrun job fail mid-step, for tests/test_distributed.py.

Used as `rank_faults:<name>` rewards (tests/ on PYTHONPATH). Rank 1 scores step 1 like
digit_match, then dies (or hangs) while scoring step 2, after checkpoint-1 has been written.
"""

import os
import time

from gspo_engine.rewards.digit_match import digit_match

_calls = {"count": 0}


def _score(completions, prompts, **columns):
    _calls["count"] += 1
    return digit_match(completions, prompts, **columns), _calls["count"] > 1 and os.environ.get("RANK") == "1"


def die_on_rank_one(completions, prompts, **columns):
    scores, fail = _score(completions, prompts, **columns)
    if fail:
        os._exit(3)  # as a killed process: no exception, no clean-up
    return scores


def hang_on_rank_one(completions, prompts, **columns):
    scores, fail = _score(completions, prompts, **columns)
    while fail:
        time.sleep(1)
    return scores
