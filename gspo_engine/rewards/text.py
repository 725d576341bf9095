"""Text helpers shared by the built-in rewards."""

from __future__ import annotations

import re

THINK_END = "</think>"
PYTHON_FENCES = ("", "python", "py", "python3")
_CODE_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def strip_thinking(completion: str) -> str:
    """The part of a completion after the reasoning block (Qwen3 closes it with </think>)."""
    _, found, answer = completion.rpartition(THINK_END)
    return answer if found else completion


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes, `$` and final period removed."""
    text = " ".join(str(text).split()).casefold()
    return text.strip().strip("$\"'`").strip().removesuffix(".").strip()


def extract_code(completion: str) -> str:
    """The last ```python (or untagged) fenced block, else the whole answer."""
    answer = strip_thinking(completion)
    blocks = [body for language, body in _CODE_BLOCK.findall(answer) if language.lower() in PYTHON_FENCES]
    return blocks[-1] if blocks else answer
