"""Prompt datasets: local JSONL / JSON / parquet files, folders written by `datasets`' save_to_disk,
Hub datasets (or generated rows), tokenized once, and a loader with a deterministic, resumable order.

Each row has a prompt column (a string, or a list of chat messages `{"role", "content"}`); every
other column (`answer`, `tests`, ...) is kept and handed to the reward functions. Prompts longer
than the limit are skipped and counted, never cut. A row that cannot be read is an error naming
its file and line (or row). Rows of a Qwen3-VL model may name images (`images` column,
vision_prompts.py), which take their places in the prompt and multiply its image tokens; rows of a
Qwen3-Omni thinker may name audio too (`audio` column, audio_prompts.py), likewise.
"""

from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from gspo_engine.audio_prompts import (
    AudioProcessing, audio_sources, expand_audio_pads, with_audio_places,
)
from gspo_engine.audio_task import generate_audio_rows
from gspo_engine.builtin_tasks import TaskConfig, generate_task_rows
from gspo_engine.config import DataConfig
from gspo_engine.hub import DatasetId, HubError, hub_dataset_rows, is_saved_dataset, parse_dataset_id, saved_dataset_rows
from gspo_engine.media_places import MediaError
from gspo_engine.tokenizer import encode_texts, render_prompt
from gspo_engine.vision_task import generate_vision_rows
from gspo_engine.vision_prompts import (
    ImageProcessing, expand_image_pads, image_sources, with_image_places,
)

logger = logging.getLogger(__name__)

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
FILE_SUFFIXES = JSON_LINES_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


class DataError(ValueError):
    """A dataset file or row that cannot be used, with where it is."""


@dataclass(frozen=True)
class PromptExample:
    index: int  # position in the dataset, after skipped rows
    text: str  # the prompt as the model sees it (chat template applied), handed to rewards
    token_ids: list[int]
    columns: dict = field(default_factory=dict)  # the row's other columns
    images: tuple = ()  # the prompt's images in order: resolved paths, PIL images or datasets' {"bytes", "path"}
    audio: tuple = ()  # the prompt's audio in order: resolved paths or {"array", "sampling_rate"} waveforms


def check_dataset_file(path: str | Path) -> Path:
    """`path` if it is a dataset file this module reads (by its suffix), else a DataError saying why."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(
            f"dataset file {path}: unknown format {path.suffix.lower()!r}; use one of "
            f"{', '.join(FILE_SUFFIXES)}"
        )
    return path


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a JSONL, JSON or parquet file, each with where it comes from (`file:line`)."""
    path = check_dataset_file(path)
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES:
        return _read_json_lines(path, path.read_text(encoding="utf-8"))
    if suffix in JSON_SUFFIXES:
        return _read_json(path)
    return _read_parquet(path)


@dataclass(frozen=True)
class DatasetSource:
    """What data.dataset names: a local file, a folder save_to_disk wrote (and a split of it), or a Hub dataset."""

    kind: Literal["file", "saved", "hub"]
    path: Path | None = None  # the file or folder
    split: str | None = None  # of a saved DatasetDict
    hub_id: DatasetId | None = None


def dataset_source(spec: str) -> DatasetSource:
    """Where the rows of `spec` come from, found without reading them; a DataError when it names nothing.

    A file or a folder on this machine wins over a Hub dataset of the same name; `FOLDER:SPLIT` takes one
    split of a saved DatasetDict, `NAME:SPLIT` one of a Hub dataset.
    """
    path = Path(spec)
    if path.is_file() or path.suffix.lower() in FILE_SUFFIXES:
        return DatasetSource("file", check_dataset_file(path))
    candidates = [(path, None)]
    before, colon, after = spec.rpartition(":")
    if colon and before and after:
        candidates.append((Path(before), after))
    for folder, split in candidates:
        if folder.is_dir():
            if not is_saved_dataset(folder):
                raise DataError(f"dataset folder {folder} was not written by datasets' save_to_disk (no state.json "
                                f"or dataset_dict.json); give a {', '.join(FILE_SUFFIXES)} file, or such a folder")
            return DatasetSource("saved", folder, split)
    hub_id = parse_dataset_id(spec)
    if hub_id is None:
        raise DataError(f"dataset {spec}: no such file or folder, and not a Hub dataset id (NAME, ORG/NAME, "
                        "NAME:SPLIT)")
    return DatasetSource("hub", hub_id=hub_id)


def dataset_rows(spec: str, subset: str | None = None) -> list[tuple[str, dict]]:
    """Rows of data.dataset (a file, a saved folder or a Hub dataset, see dataset_source) with where each
    comes from; `subset` (data.subset) is a Hub dataset's configuration."""
    source = dataset_source(spec)
    if subset is not None and source.kind != "hub":
        raise DataError(f"data.subset: {subset!r} picks a configuration of a Hub dataset; {spec} is a local "
                        f"{'file' if source.kind == 'file' else 'folder'}")
    try:
        if source.kind == "file":
            return read_rows(source.path)
        if source.kind == "saved":
            return saved_dataset_rows(source.path, source.split)
        return hub_dataset_rows(source.hub_id, subset)
    except HubError as error:
        raise DataError(str(error)) from error


def _read_json_lines(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON: {error.msg} (column {error.colno})") from error
        rows.append((f"{path}:{number}", row))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        # `datasets` and pandas write .json files as JSON lines by default.
        return _read_json_lines(path, text)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON: {error.msg} (column {error.colno})") from error
    return [(f"{path}: item {number}", item) for number, item in enumerate(items)]


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from error
    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file: {error}") from error
    return [(f"{path}: row {number}", row) for number, row in enumerate(table.to_pylist())]


def _check_prompt(where: str, row, prompt_column: str):
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if prompt_column not in row:
        raise DataError(f"{where}: no {prompt_column!r} column (columns: {sorted(row)})")
    prompt = row[prompt_column]
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{where}: the prompt is empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(
        isinstance(message, dict) and isinstance(message.get("role"), str) and _is_content(message.get("content"))
        for message in prompt
    ):
        return prompt
    raise DataError(f"{where}: the prompt must be a string or a list of {{'role', 'content'}} messages")


def _is_content(content) -> bool:
    """A message's content: a string, or a list of parts ({"type": "text", "text"} / {"type": "image"})."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(part, dict) and isinstance(part.get("type"), str)
                                             for part in content)


class PromptDataset:
    """Tokenized prompts with their other columns; `num_skipped` counts prompts over the limit."""

    def __init__(self, examples: list[PromptExample], num_skipped: int = 0):
        self.examples = examples
        self.num_skipped = num_skipped

    @classmethod
    def from_rows(
        cls,
        rows: list[tuple[str, dict]] | list[dict],
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt_column: str = "prompt",
        max_prompt_tokens: int = 1024,
        chat_template: bool = False,
        enable_thinking: bool | None = None,
        source: str = "rows",
        vision: ImageProcessing | None = None,
        image_root: Path | None = None,
        audio: AudioProcessing | None = None,
    ) -> PromptDataset:
        """`rows`: plain dicts (generated rows) or `(where, row)` pairs from `read_rows`.

        vision: the image processor of a Qwen3-VL model, for rows with an `images` column (paths relative to
        image_root); without it such a row is an error. audio: a Qwen3-Omni thinker's feature extractor, for rows
        with an `audio` column (paths relative to image_root), likewise.
        """
        located = [
            row if isinstance(row, tuple) else (f"{source}: row {number}", row) for number, row in enumerate(rows)
        ]
        if not located:
            raise DataError(f"{source}: the dataset has no rows")
        prompts = [_check_prompt(where, row, prompt_column) for where, row in located]
        row_images = [_row_images(where, row, vision, image_root) for where, row in located]
        prompts = [prompt if not images else _with_places(prompt, len(images), where)
                   for (where, _), prompt, images in zip(located, prompts, row_images)]
        row_audio = [_row_audio(where, row, audio, image_root) for where, row in located]
        prompts = [prompt if not sounds else _with_audio_places(prompt, len(sounds), audio, where)
                   for (where, _), prompt, sounds in zip(located, prompts, row_audio)]
        texts = [
            render_prompt(tokenizer, prompt, chat_template=chat_template, enable_thinking=enable_thinking)
            for prompt in prompts
        ]
        templated = [chat_template or not isinstance(prompt, str) for prompt in prompts]
        token_ids = encode_texts(tokenizer, texts, templated)
        examples = []
        for (where, row), text, ids, images, sounds in zip(located, texts, token_ids, row_images, row_audio):
            if images:
                ids = _expand_images(ids, images, vision, where)
            if sounds:
                ids = _expand_audio(ids, sounds, audio, where)
            if len(ids) > max_prompt_tokens:
                continue
            columns = {name: value for name, value in row.items() if name not in (prompt_column, "images", "audio")}
            examples.append(PromptExample(len(examples), text, ids, columns, tuple(source for source, _ in images),
                                          tuple(source for source, _ in sounds)))
        num_skipped = len(located) - len(examples)
        if num_skipped:
            logger.warning(
                "%s: skipped %d of %d prompts longer than %d tokens",
                source, num_skipped, len(located), max_prompt_tokens,
            )
        if not examples:
            raise DataError(
                f"{source}: no prompt left: all {len(located)} are longer than {max_prompt_tokens} tokens"
            )
        return cls(examples, num_skipped)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptExample:
        return self.examples[index]


@contextmanager
def _as_data_error():
    """An image or audio that cannot be placed or read stops loading as a DataError with the same message."""
    try:
        yield
    except MediaError as error:
        raise DataError(str(error)) from error


def _row_media(where: str, sources_of, processing, root: Path | None, refusal: str) -> list[tuple]:
    """(source, opened item) of each image or audio a row names, every one checked to open; [] without any.
    sources_of() lists them; `refusal` says why a model without the matching tower takes none."""
    with _as_data_error():
        sources = sources_of()
        if sources and processing is None:
            raise DataError(f"{where}: {refusal}")
        out = []
        for source in sources:
            opened = processing.open(source, where, root)
            resolved = source if not isinstance(source, str) or Path(source).is_absolute() or root is None \
                else str(root / source)
            out.append((resolved, opened))
        return out


def _row_images(where: str, row: dict, vision: ImageProcessing | None, root: Path | None) -> list[tuple]:
    return _row_media(where, lambda: image_sources(row.get("images"), where), vision, root,
                      "the row has images, and the model takes none (it has no vision tower)")


def _row_audio(where: str, row: dict, audio: AudioProcessing | None, root: Path | None) -> list[tuple]:
    return _row_media(where, lambda: audio_sources(row.get("audio"), where), audio, root,
                      "the row has audio, and the model takes none (it has no audio encoder)")


def _with_places(prompt, count: int, where: str):
    with _as_data_error():
        return with_image_places(prompt, count, where)


def _with_audio_places(prompt, count: int, audio: AudioProcessing, where: str):
    with _as_data_error():
        return with_audio_places(prompt, count, audio.place, where)


def _expand_images(ids: list[int], images: list[tuple], vision: ImageProcessing, where: str) -> list[int]:
    counts = vision.token_counts(vision.inputs([image for _, image in images]))
    with _as_data_error():
        return expand_image_pads(ids, counts, vision.vision, where)


def _expand_audio(ids: list[int], sounds: list[tuple], audio: AudioProcessing, where: str) -> list[int]:
    counts = audio.token_counts(audio.inputs([wave for _, wave in sounds]))
    with _as_data_error():
        return expand_audio_pads(ids, counts, audio.audio, where)


def reward_inputs(examples: list[PromptExample], group_size: int) -> tuple[list[str], dict[str, list]]:
    """Prompts and columns for the reward functions, each prompt repeated for its `group_size`
    completions (in order: all completions of the first prompt, then the second's, ...). A column
    missing from some rows is None there."""
    names = sorted({name for example in examples for name in example.columns})
    prompts = [example.text for example in examples for _ in range(group_size)]
    columns = {name: [example.columns.get(name) for example in examples for _ in range(group_size)] for name in names}
    return prompts, columns


class PromptLoader:
    """Batches of examples in a deterministic order: a fresh permutation of the dataset each
    epoch, drawn from (seed, epoch). A batch that reaches the end of an epoch is completed from the
    next one. `state_dict()` records the position; `load_state_dict` resumes from it exactly.
    With `num_epochs`, iteration stops after that many passes (the last batch may be short)."""

    def __init__(
        self,
        dataset: PromptDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.epoch = 0
        self.position = 0  # examples of the current epoch already handed out
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # Seeding with a string is stable across Python versions and processes (no hash salt).
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[PromptExample]:
        batch: list[PromptExample] = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                if self.num_epochs is not None and self.epoch + 1 >= self.num_epochs:
                    break
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.position)
            batch.extend(self.dataset[index] for index in self._order[self.position : self.position + take])
            self.position += take
        if not batch:
            raise StopIteration
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        expected = {"seed": self.seed, "shuffle": self.shuffle, "dataset_size": len(self.dataset)}
        different = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
        if different:
            raise ValueError(f"cannot resume the prompt order: saved vs current {different}")
        if not 0 <= state["position"] <= len(self.dataset):
            raise ValueError(f"saved position {state['position']} is outside a dataset of {len(self.dataset)}")
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._epoch_order(self.epoch)


def build_dataset(data: DataConfig, tokenizer: PreTrainedTokenizerBase,
                  vision: ImageProcessing | None = None, audio: AudioProcessing | None = None) -> PromptDataset:
    """The run's prompts: the built-in digit tasks (`data.dataset: builtin`), the built-in vision tasks
    (`builtin_vision`), the built-in audio tasks (`builtin_audio`), a local file, a save_to_disk folder or a Hub
    dataset. vision: a Qwen3-VL model's image processing, for rows with images; audio: a Qwen3-Omni thinker's
    feature extraction, for rows with audio."""
    common = dict(prompt_column=data.prompt_column, max_prompt_tokens=data.max_prompt_tokens,
                  chat_template=data.chat_template, enable_thinking=data.enable_thinking, vision=vision, audio=audio)
    if data.dataset == "builtin_audio":
        rows = generate_audio_rows(tuple(data.builtin.tasks), data.builtin.num_rows, seed=data.seed)
        return PromptDataset.from_rows(rows, tokenizer, source="builtin audio tasks", **common)
    if data.dataset == "builtin_vision":
        rows = generate_vision_rows(tuple(data.builtin.tasks), data.builtin.num_rows, seed=data.seed)
        return PromptDataset.from_rows(rows, tokenizer, source="builtin vision tasks", **common)
    if data.dataset == "builtin":
        tasks = TaskConfig(tasks=tuple(data.builtin.tasks), min_length=data.builtin.min_length,
                           max_length=data.builtin.max_length, num_digits=data.builtin.num_digits)
        rows = generate_task_rows(tasks, data.builtin.num_rows, seed=data.seed)
        return PromptDataset.from_rows(rows, tokenizer, source="builtin tasks", **common)
    source = dataset_source(data.dataset)
    root = source.path.parent if source.kind == "file" else Path.cwd()
    return PromptDataset.from_rows(dataset_rows(data.dataset, data.subset), tokenizer, source=data.dataset,
                                   image_root=root, **common)
