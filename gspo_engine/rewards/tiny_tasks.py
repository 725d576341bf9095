"""`digit_match`: the partial-credit reward of the built-in digit tasks (see gspo_engine.tasks)."""

from gspo_engine.rewards.registry import register_reward
from gspo_engine.tasks import digit_match

register_reward("digit_match")(digit_match)
