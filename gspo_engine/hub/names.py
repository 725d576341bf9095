"""How models and datasets are named on the Hugging Face Hub: `ORG/NAME[@REVISION]` for a model,
`[ORG/]NAME[:SPLIT]` for a dataset. A leaf: parsing only, nothing is looked up."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_MODEL_REPO = re.compile(rf"{_PART}/{_PART}")
_DATASET_REPO = re.compile(rf"(?:{_PART}/)?{_PART}")


class HubError(ValueError):
    """A model or dataset that cannot be had from the Hub or its cache; the message says what to do."""


@dataclass(frozen=True)
class ModelId:
    repo_id: str  # ORG/NAME
    revision: str | None = None  # a branch, tag or commit; None: the default branch

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class DatasetId:
    repo_id: str  # NAME or ORG/NAME
    split: str | None = None  # None: "train" (of a save_to_disk folder with one split: that one)


def _valid_repo(text: str, pattern: re.Pattern) -> bool:
    # The Hub refuses "--" and ".." in names: they would be ambiguous in its cache folders.
    return bool(pattern.fullmatch(text)) and "--" not in text and ".." not in text


def parse_model_id(text: str) -> ModelId | None:
    """`ORG/NAME[@REVISION]` as a ModelId; None when `text` cannot be a Hub model id."""
    repo_id, at, revision = text.partition("@")
    if not _valid_repo(repo_id, _MODEL_REPO) or (at and not revision.strip()):
        return None
    return ModelId(repo_id, revision.strip() or None)


def parse_dataset_id(text: str) -> DatasetId | None:
    """`[ORG/]NAME[:SPLIT]` as a DatasetId (SPLIT may slice: `train[:1000]`); None when it cannot be one."""
    repo_id, colon, split = text.partition(":")
    if not _valid_repo(repo_id, _DATASET_REPO) or (colon and not split.strip()):
        return None
    return DatasetId(repo_id, split.strip() or None)
