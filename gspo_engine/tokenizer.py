"""The model's tokenizer, loaded from its folder without network access, and prompt rendering."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# A folder needs one of these for AutoTokenizer to build a tokenizer from it.
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


class TokenizerError(ValueError):
    """A tokenizer folder or a prompt that the tokenizer cannot serve."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path` (a model folder), read from local files only."""
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        raise TokenizerError(
            f"{folder} holds no tokenizer: expected one of {', '.join(VOCABULARY_FILES)} "
            "(copy the tokenizer files of the model there; nothing is downloaded)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"cannot load the tokenizer in {folder}: {error}") from error
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"the tokenizer in {folder} has no eos token: generation could never stop")
    return tokenizer


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict],
    *,
    chat_template: bool = False,
    enable_thinking: bool | None = None,
) -> str:
    """The prompt's text as the model sees it.

    Chat messages always go through the tokenizer's chat template (with the generation prompt
    appended); a plain string does too when `chat_template` is set, as one user message.
    `enable_thinking` reaches Qwen3's template when given; None leaves the template's default.
    """
    if isinstance(prompt, str) and not chat_template:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not tokenizer.chat_template:
        raise TokenizerError(
            "the prompt needs a chat template (it is a list of chat messages or `chat_template` is set) "
            "but the tokenizer has none"
        )
    options = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], templated: list[bool]) -> list[list[int]]:
    """Token ids of each text. A templated text already holds its special tokens, so none are added."""
    ids: list[list[int]] = [[] for _ in texts]
    for add_special_tokens in (True, False):
        chosen = [index for index, flag in enumerate(templated) if flag != add_special_tokens]
        if chosen:
            encoded = tokenizer([texts[index] for index in chosen], add_special_tokens=add_special_tokens)
            for index, token_ids in zip(chosen, encoded["input_ids"]):
                ids[index] = list(token_ids)
    return ids


def eos_token_ids(folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a completion: generation_config.json's eos ids (Qwen3 lists two) and the tokenizer's."""
    ids = {tokenizer.eos_token_id}
    generation_config = Path(folder) / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return sorted(i for i in ids if i is not None)
