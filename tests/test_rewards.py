"""Rewards: registry and imports, the weighted combination and its failure handling, the built-ins."""

from __future__ import annotations

import logging
import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from gspo_engine.rewards import REWARDS, CombinedReward, RewardSpec, build_reward, resolve_reward
from gspo_engine.rewards.text import extract_code, normalize_answer, strip_thinking

USER_REWARDS = """
def length_bonus(completions, prompts, *, scale=1.0, **columns):
    return [scale * len(completion) for completion in completions]

def count_answers(completions, prompts, *, answer, **columns):
    return [float(len(answer))] * len(completions)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_builtins_are_registered():
    assert {"exact_match", "math", "format", "code", "digit_match"} <= set(REWARDS)


def test_resolve_by_name_and_by_import_path(user_module):
    assert resolve_reward("exact_match") is REWARDS["exact_match"]
    length_bonus = build_reward(f"{user_module}:length_bonus", {"scale": 2.0})
    assert length_bonus(["ab", ""], ["p", "q"]) == [4.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("no_such_reward", "unknown reward"),
    ("no_such_module_anywhere:fn", "cannot import"),
    ("math:no_such_function", "no callable"),
])
def test_unknown_rewards_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward(spec)


def test_bad_options_are_refused_when_built(user_module):
    with pytest.raises(ValueError, match="does not take options"):
        build_reward("exact_match", {"no_such_option": 1})
    with pytest.raises(ValueError, match="invalid regex"):
        build_reward("format", {"pattern": "(unclosed"})
    with pytest.raises(ValueError, match="bad options"):
        build_reward("format", {})


def test_weighted_sum_and_each_reward_on_its_own(user_module):
    rewards = CombinedReward([
        RewardSpec("exact_match", weight=2.0),
        RewardSpec(f"{user_module}:length_bonus", weight=0.5, name="length", options={"scale": 0.1}),
    ])
    batch = rewards(["42", "41 "], ["q", "q"], {"answer": ["42", "42"]})
    assert batch.per_reward == {"exact_match": [1.0, 0.0], "length": pytest.approx([0.2, 0.3])}
    assert batch.total == pytest.approx([2.0 + 0.5 * 0.2, 0.5 * 0.3])
    assert batch.failures == {"exact_match": 0, "length": 0}


def test_columns_reach_the_reward_functions(user_module):
    rewards = CombinedReward([RewardSpec(f"{user_module}:count_answers")])
    assert rewards(["a", "b", "c"], ["p"] * 3, {"answer": ["x", "y", "z"], "other": [1, 2, 3]}).total == [3.0] * 3


def test_duplicate_names_and_ragged_columns_are_refused():
    with pytest.raises(ValueError, match="appear twice"):
        CombinedReward([RewardSpec("exact_match"), RewardSpec("exact_match")])
    with pytest.raises(ValueError, match="column 'answer'"):
        CombinedReward([RewardSpec("exact_match")])(["a", "b"], ["p", "p"], {"answer": ["a"]})


def raises(completions, prompts, **columns):
    raise RuntimeError("reward exploded")


def wrong_count(completions, prompts, **columns):
    return [1.0]


def odd_values(completions, prompts, **columns):
    return [None, "1.0", float("nan"), np.float32(0.5), torch.tensor(0.25), True, math.inf, [1.0]]


def test_failing_rewards_give_zero_are_counted_and_logged_once(monkeypatch, caplog):
    monkeypatch.setitem(REWARDS, "test_raises", raises)
    monkeypatch.setitem(REWARDS, "test_wrong_count", wrong_count)
    monkeypatch.setitem(REWARDS, "test_odd_values", odd_values)
    rewards = CombinedReward([
        RewardSpec("test_raises"), RewardSpec("test_wrong_count"), RewardSpec("test_odd_values"),
        RewardSpec("exact_match", weight=1.0),
    ])
    completions = ["a"] * 8
    columns = {"answer": ["a"] * 8}
    with caplog.at_level(logging.ERROR, logger="gspo_engine.rewards.combine"):
        first = rewards(completions, ["p"] * 8, columns)
        second = rewards(completions, ["p"] * 8, columns)
    assert first.per_reward["test_raises"] == [0.0] * 8
    assert first.per_reward["test_wrong_count"] == [0.0] * 8
    assert first.per_reward["test_odd_values"] == [0.0, 0.0, 0.0, 0.5, 0.25, 1.0, 0.0, 0.0]
    assert first.total == [1.0 + value for value in first.per_reward["test_odd_values"]]
    assert first.failures == {"test_raises": 8, "test_wrong_count": 8, "test_odd_values": 5, "exact_match": 0}
    assert second.failures == first.failures
    assert rewards.failure_counts == {
        "test_raises": 16, "test_wrong_count": 16, "test_odd_values": 10, "exact_match": 0,
    }
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3  # the first failure of each failing reward, no more
    assert "RuntimeError: reward exploded" in messages[0] and "Traceback" in messages[0]
    assert "returned 1 values for 8 completions" in messages[1]


def test_text_helpers():
    assert strip_thinking("<think>\nmaybe 3\n</think>\n\n4") == "\n\n4"
    assert strip_thinking("no reasoning") == "no reasoning"
    assert normalize_answer("  The  Answer.  ") == "the answer"
    assert normalize_answer("$42$") == "42"
    completion = (
        "<think>```python\nwrong = 1\n```</think>Here:\n```python\ndef f():\n    return 1\n```\nand\n```\nx = 2\n```"
    )
    assert extract_code(completion) == "x = 2\n"
    assert extract_code("```js\nlet a\n```\n```py\nb = 1\n```") == "b = 1\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"


def test_exact_match():
    score = REWARDS["exact_match"]
    completions = ["<think>it is 7</think> Paris.", "paris", "Lyon", " 12 "]
    assert score(completions, [""] * 4, answer=["Paris", "Paris", "Paris", 12]) == [1.0, 1.0, 0.0, 1.0]
    rewards = CombinedReward([RewardSpec("exact_match")])
    batch = rewards(["None", "4"], ["", ""], {"answer": [None, "4"]})
    assert batch.per_reward["exact_match"] == [0.0, 1.0] and batch.failures == {"exact_match": 1}


def test_math_compares_values_not_strings():
    score = REWARDS["math"]
    completions = [
        "So the result is $\\boxed{\\frac{1}{2}}$.",
        "<think>maybe \\boxed{3}</think> The answer is \\boxed{0.5}",
        "The answer is $\\boxed{2}$",
        "I do not know",
        "$x = 12$",
    ]
    answers = ["0.5", "\\frac{1}{2}", "3", "7", "12"]
    assert score(completions, [""] * 5, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_math_answer_that_cannot_be_parsed_is_a_counted_failure():
    rewards = CombinedReward([RewardSpec("math")])
    batch = rewards(["\\boxed{1}", "\\boxed{2}"], ["", ""], {"answer": ["1", "no number here"]})
    assert batch.per_reward["math"] == [1.0, 0.0]
    assert batch.failures == {"math": 1}


def test_math_without_math_verify_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match="pip install math-verify"):
        REWARDS["math"](["1"], [""], answer=["1"])


def test_format_reward_matches_the_whole_completion():
    reward = build_reward("format", {"pattern": r"<think>.*?</think>\s*<answer>.*?</answer>"})
    completions = [
        "<think>a\nb</think>\n<answer>4</answer>", "<answer>4</answer>", "<think></think><answer>4</answer> extra",
    ]
    assert reward(completions, [""] * 3) == [1.0, 0.0, 0.0]


def test_code_reward_scores_the_fraction_of_tests_passed():
    rewards = CombinedReward([RewardSpec("code", options={"timeout_s": 5.0, "max_workers": 2})])
    tests = textwrap.dedent("""
        assert square(2) == 4
        assert square(-3) == 9
        def test_zero():
            assert square(0) == 0
    """)
    completions = [
        "Here it is:\n```python\ndef square(x):\n    return x * x\n```",
        "```python\ndef square(x):\n    return abs(x) * 2\n```",
        "def square(x): return x * x",
    ]
    batch = rewards(completions, [""] * 3, {"tests": [tests, tests, "not python ("]})
    assert batch.per_reward["code"] == pytest.approx([1.0, 2 / 3, 0.0])
    assert batch.failures == {"code": 1}
