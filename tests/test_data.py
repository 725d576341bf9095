"""Prompt data: reading files, chat templates, the length limit, errors with locations, the loader order."""

from __future__ import annotations

import json
import logging
import string

import pyarrow
import pyarrow.parquet
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from gspo_engine.builtin_tasks import TaskConfig, generate_task_rows
from gspo_engine.data import DataError, PromptDataset, PromptLoader, read_rows, reward_inputs
from gspo_engine.tiny import save_tiny_tokenizer
from gspo_engine.tokenizer import TokenizerError, load_tokenizer, render_prompt

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's template reduced to what matters here: roles, the generation prompt, enable_thinking.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def save_char_tokenizer(folder, chat_template: str | None = CHAT_TEMPLATE):
    """One token per printable character plus Qwen3's special tokens, with an optional chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = {token: index for index, token in enumerate([*SPECIAL, "<unk>", *string.printable])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(save_char_tokenizer(tmp_path_factory.mktemp("chat_tokenizer")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_file(path, tokenizer, **options):
    """A dataset file, read and tokenized as the trainer reads data.dataset."""
    return PromptDataset.from_rows(read_rows(path), tokenizer, source=str(path), **options)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


def test_render_prompt_applies_the_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    rendered = render_prompt(tokenizer, messages)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, "2+2?") == "2+2?"
    as_chat = render_prompt(tokenizer, "2+2?", chat_template=True, enable_thinking=False)
    assert as_chat == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render_prompt(tokenizer, "2+2?", chat_template=True, enable_thinking=True).endswith("assistant\n")


def test_messages_without_a_chat_template_are_an_error(tmp_path):
    plain = load_tokenizer(save_char_tokenizer(tmp_path, chat_template=None))
    with pytest.raises(TokenizerError, match="has none"):
        render_prompt(plain, [{"role": "user", "content": "hi"}])


def test_jsonl_rows_keep_their_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "What is 2+2?", "answer": "4"},
        {"prompt": [{"role": "user", "content": "Say hi"}], "answer": "hi", "tests": ["assert True"]},
    ])
    dataset = load_file(path, tokenizer)
    assert len(dataset) == 2 and dataset.num_skipped == 0
    first, second = dataset[0], dataset[1]
    assert first.text == "What is 2+2?" and first.columns == {"answer": "4"}
    assert tokenizer.decode(first.token_ids) == first.text
    assert second.text == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert second.token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert second.columns == {"answer": "hi", "tests": ["assert True"]}


def test_chat_template_flag_and_enable_thinking_reach_string_prompts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "Why?", "answer": "because"}])
    example = load_file(path, tokenizer, prompt_column="question", chat_template=True, enable_thinking=False)[0]
    assert example.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert example.columns == {"answer": "because"}


def test_json_list_json_lines_and_parquet_read_alike(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "lines.json", rows)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("list.json", "lines.json", "rows.parquet"):
        assert [row for _, row in read_rows(tmp_path / name)] == rows, name
    assert read_rows(tmp_path / "rows.parquet")[1][0].endswith("rows.parquet: row 1")


def test_parquet_chat_messages(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "chat.parquet")
    example = load_file(tmp_path / "chat.parquet", tokenizer)[0]
    assert example.text.startswith("<|im_start|>user\nhi<|im_end|>")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n', r"bad\.jsonl:3: not valid JSON"),
    ('{"prompt": "a"}\n\n{"question": "b"}\n', r"bad\.jsonl:3: no 'prompt' column"),
    ('{"prompt": "a"}\n[1, 2]\n', r"bad\.jsonl:2: a row must be a JSON object"),
    ('{"prompt": ""}\n', r"bad\.jsonl:1: the prompt is empty"),
    ('{"prompt": [{"role": "user"}]}\n', r"bad\.jsonl:1: the prompt must be a string or a list"),
    ('{"prompt": 3}\n', r"bad\.jsonl:1: the prompt must be"),
])
def test_bad_rows_name_their_file_and_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_file(path, tokenizer)


def test_bad_files_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("prompt\na\n")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        read_rows(tmp_path / "data.csv")
    (tmp_path / "broken.json").write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: not valid JSON"):
        read_rows(tmp_path / "broken.json")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_rows(tmp_path / "broken.parquet")


def test_long_prompts_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    lengths = (3, 9, 5, 12, 6)
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "x" * length, "id": length} for length in lengths])
    with caplog.at_level(logging.WARNING, logger="gspo_engine.data"):
        dataset = load_file(path, tokenizer, max_prompt_tokens=6)
    assert [example.columns["id"] for example in dataset] == [3, 5, 6]
    assert [example.index for example in dataset] == [0, 1, 2]
    assert dataset.num_skipped == 2
    assert "skipped 2 of 5 prompts longer than 6 tokens" in caplog.text
    with pytest.raises(DataError, match="no prompt left"):
        load_file(path, tokenizer, max_prompt_tokens=2)


@pytest.fixture(scope="module")
def task_dataset(tmp_path_factory):
    tiny = load_tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tiny")))
    return PromptDataset.from_rows(generate_task_rows(TaskConfig(), 23, seed=0), tiny, source="tasks")


def indices(batches):
    return [[example.index for example in batch] for batch in batches]


def test_loader_order_is_a_seeded_permutation_per_epoch(task_dataset):
    loader = PromptLoader(task_dataset, batch_size=5, seed=3, num_epochs=3)
    batches = indices(loader)
    flat = [index for batch in batches for index in batch]
    assert len(flat) == 3 * 23 and [len(batch) for batch in batches][-1] == 69 - 13 * 5
    epochs = [flat[:23], flat[23:46], flat[46:]]
    assert all(sorted(epoch) == list(range(23)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    assert indices(PromptLoader(task_dataset, batch_size=5, seed=3, num_epochs=3)) == batches
    assert indices(PromptLoader(task_dataset, batch_size=5, seed=4, num_epochs=3)) != batches
    in_order = indices(PromptLoader(task_dataset, batch_size=10, shuffle=False, num_epochs=1))
    assert in_order == [list(range(10)), list(range(10, 20)), [20, 21, 22]]


def test_loader_resumes_exactly_from_its_state(task_dataset):
    reference = PromptLoader(task_dataset, batch_size=7, seed=11)
    expected = indices(next(reference) for _ in range(12))
    first = PromptLoader(task_dataset, batch_size=7, seed=11)
    head = indices(next(first) for _ in range(5))
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = PromptLoader(task_dataset, batch_size=7, seed=11)
    resumed.load_state_dict(state)
    assert head + indices(next(resumed) for _ in range(7)) == expected
    assert resumed.epoch == 84 // 23


def test_loader_refuses_a_state_of_other_data(task_dataset):
    state = PromptLoader(task_dataset, batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="cannot resume"):
        PromptLoader(task_dataset, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot resume"):
        PromptLoader(task_dataset, batch_size=4, seed=1).load_state_dict(state | {"dataset_size": 5})


def test_reward_inputs_repeat_each_prompt_for_its_group(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "tests": "assert 1"}])
    dataset = load_file(path, tokenizer)
    prompts, columns = reward_inputs([dataset[0], dataset[1]], group_size=2)
    assert prompts == ["a", "a", "b", "b"]
    assert columns == {"answer": ["1", "1", None, None], "tests": [None, None, "assert 1", "assert 1"]}
