"""Built-in digit tasks: generation, the digit_match reward, the tiny tokenizer through AutoTokenizer."""

from __future__ import annotations

import json
import random

import pytest

from gspo_engine.builtin_tasks import SOLVERS, TaskConfig, generate_task_rows, task_prompt
from gspo_engine.config import BUILTIN_TASKS
from gspo_engine.rewards.digit_match import digit_match
from gspo_engine.tiny import EOS, save_tiny_tokenizer, tiny_vocabulary
from gspo_engine.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return load_tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer")))


def test_rows_follow_the_seed_and_the_config():
    config = TaskConfig(tasks=("reverse", "sort"), min_length=3, max_length=4, num_digits=3)
    rows = generate_task_rows(config, 200, seed=7)
    assert rows == generate_task_rows(config, 200, seed=7)
    assert rows != generate_task_rows(config, 200, seed=8)
    assert {row["task"] for row in rows} == {"reverse", "sort"}
    for row in rows:
        digits = row["prompt"].removeprefix(f"<{row['task']}>").removesuffix("=")
        assert 3 <= len(digits) <= 4 and set(digits) <= set("012")
        assert row["prompt"] == task_prompt(row["task"], digits)
        assert row["answer"] == SOLVERS[row["task"]](digits)


def test_solvers():
    assert SOLVERS["copy"]("3141") == "3141"
    assert SOLVERS["reverse"]("3141") == "1413"
    assert SOLVERS["sort"]("3141") == "1134"
    # The config accepts exactly the tasks there is a solver for, and the tiny tokenizer has a tag for each.
    assert tuple(SOLVERS) == BUILTIN_TASKS
    assert [f"<{task}>" for task in BUILTIN_TASKS] == tiny_vocabulary()[-len(BUILTIN_TASKS):]


@pytest.mark.parametrize("options", [
    dict(tasks=()), dict(tasks=("add",)), dict(min_length=0), dict(min_length=5, max_length=4), dict(num_digits=11),
])
def test_config_refuses_bad_values(options):
    with pytest.raises(ValueError):
        TaskConfig(**options)


def test_digit_match_gives_partial_credit():
    completions = ["1413", "1 4 1 3", "1431", "3141", "14", "141399", "", "abcd"]
    scores = digit_match(completions, [""] * len(completions), answer=["1413"] * len(completions))
    # (in place + in common + shorter length) / (3 * longer length)
    assert scores == pytest.approx([1.0, 1.0, (2 + 4 + 4) / 12, (0 + 4 + 4) / 12, (2 + 2 + 2) / 12,
                                    (4 + 4 + 4) / 18, 0.0, (0 + 0 + 4) / 12])
    assert digit_match([""], [""], answer=[""]) == [1.0]


def test_stopping_at_the_right_length_pays_before_the_digits_are_right():
    right_length, too_long = digit_match(["84", "8484"], ["", ""], answer=["48", "48"])
    assert right_length > too_long


def test_digit_match_ranks_closer_answers_higher():
    rng = random.Random(0)
    for _ in range(200):
        answer = "".join(rng.choices("0123456789", k=rng.randint(2, 6)))
        wrong_digit = answer[:-1] + str((int(answer[-1]) + 1) % 10)
        random_text = "".join(rng.choices("0123456789=", k=rng.randint(0, 8)))
        exact, near, noise = digit_match([answer, wrong_digit, random_text], [""] * 3, answer=[answer] * 3)
        assert exact == 1.0 and near < 1.0 and (noise < 1.0 or random_text == answer)
        assert near >= 2 / 3


def test_tiny_tokenizer_files_load_through_autotokenizer(tmp_path, tiny_tokenizer):
    folder = save_tiny_tokenizer(tmp_path)
    assert sorted(path.name for path in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == EOS
    assert len(tiny_tokenizer) == len(tiny_vocabulary()) < 40
    # <eos> also pads, as in Qwen3's base models, so that no token disappears inside a decoded completion.
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == EOS
    assert tiny_tokenizer.all_special_tokens == [EOS]


def test_tiny_tokenizer_round_trip(tiny_tokenizer):
    for row in generate_task_rows(TaskConfig(), 50, seed=3):
        ids = tiny_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        digits = len(row["answer"])
        assert len(ids) == digits + 2  # task tag, one per digit, "="
        assert tiny_tokenizer.decode(ids) == row["prompt"]
        answer_ids = tiny_tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        completion = answer_ids + [tiny_tokenizer.eos_token_id] * 2
        assert tiny_tokenizer.decode(completion, skip_special_tokens=True) == row["answer"]


def test_unknown_text_stays_visible_after_decoding(tiny_tokenizer):
    ids = tiny_tokenizer("12x", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tiny_vocabulary().index("<unk>")
    decoded = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == "12<unk>"
    assert digit_match([decoded], [""], answer=["12"])[0] < 1.0
