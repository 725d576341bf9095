"""Built-in digit tasks for the tiny default model, their partial-credit reward, and their tokenizer.

A prompt is `<task>DIGITS=` and the expected completion is the task's answer followed by the eos
token: `<copy>3141=` -> `3141`, `<reverse>3141=` -> `1413`, `<sort>3141=` -> `1134`. Rows are
generated from a seed, so a run can be repeated exactly without a data file. `digit_match` gives
credit per digit and for the length, which a tiny randomly initialised model can climb by small
steps: stop at the right length and emit the prompt's digits, then put them in the right places.

The tokenizer has one token per digit, one per task, `=`, `<eos>` (which also pads) and `<unk>`; it is
saved as tokenizer.json + tokenizer_config.json so that it loads through AutoTokenizer like a
released model's.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

SOLVERS = {
    "copy": lambda digits: digits,
    "reverse": lambda digits: digits[::-1],
    "sort": lambda digits: "".join(sorted(digits)),
}
EOS, UNK = "<eos>", "<unk>"
SEPARATOR = "="


@dataclass(frozen=True)
class TaskConfig:
    """Which tasks, and how hard: string lengths and how many distinct digits appear (2..10)."""

    tasks: tuple[str, ...] = ("copy", "reverse", "sort")
    min_length: int = 2
    max_length: int = 4
    num_digits: int = 10

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(SOLVERS))
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be some of {sorted(SOLVERS)}, got {list(self.tasks)}")
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


def digit_match(completions: list[str], prompts: list[str], *, answer: list[str], **_columns) -> list[float]:
    """A third each for digits in the right place, the right digits in any order, and the right
    length, all over the longer of answer and completion (so extra characters cost); 1 only for
    the exact answer. The length third makes stopping on time pay before the digits are right."""
    scores = []
    for completion, expected in zip(completions, answer):
        predicted = "".join(completion.split())
        expected = str(expected)
        longest = max(len(predicted), len(expected))
        if longest == 0:
            scores.append(1.0)
            continue
        in_place = sum(p == e for p, e in zip(predicted, expected))
        in_common = sum((Counter(predicted) & Counter(expected)).values())
        shortest = min(len(predicted), len(expected))
        scores.append((in_place + in_common + shortest) / (3 * longest))
    return scores


def tiny_vocabulary() -> list[str]:
    return [EOS, UNK, *"0123456789", SEPARATOR, *(f"<{task}>" for task in SOLVERS)]


def save_tiny_tokenizer(folder: str | Path, model_max_length: int = 256) -> Path:
    """Write tokenizer.json and tokenizer_config.json of the task tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = {token: index for index, token in enumerate(tiny_vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=UNK))
    # One piece per task tag, one per other character; Fuse joins them back without spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[a-z]+>|[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    # Only <eos> is special, and it also pads (as in Qwen3's base models): a completion ends at its
    # first <eos>, so no token can vanish from the decoded text in the middle of one (with a separate
    # pad token, RL learns to shorten answers by emitting it). <unk> stays an ordinary token, not
    # named in the config where transformers would make it special, for the same reason.
    tokenizer.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
