"""Prompt rows through the `datasets` library: a folder written by `save_to_disk`, or a Hub dataset
(`NAME`, `ORG/NAME`, `NAME:SPLIT`, with data.subset as its configuration) downloaded into the datasets
cache, or read from it when offline (HF_HUB_OFFLINE=1).

A DatasetDict without a split asked for gives its "train" split, or its only one. Rows come back as
`(where, row)` pairs, as data.read_rows gives them for files.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import is_offline_mode

from gspo_engine.hub.names import DatasetId, HubError

DEFAULT_SPLIT = "train"
# What save_to_disk writes: a Dataset's state, or a DatasetDict's list of splits.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


def is_saved_dataset(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in SAVED_DATASET_FILES)


def _pick_split(loaded, split: str | None, where: str):
    """The Dataset of `loaded` (a Dataset, or a DatasetDict and the split to take from it)."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise HubError(f"{where} holds one dataset, not splits; drop :{split}")
        return loaded
    splits = list(loaded)
    if split is None:
        split = DEFAULT_SPLIT if DEFAULT_SPLIT in splits or len(splits) != 1 else splits[0]
    if split not in splits:
        raise HubError(f"{where} has no split {split!r}; choose one with {where}:SPLIT ({', '.join(splits)})")
    return loaded[split]


def _located(dataset, source: str) -> list[tuple[str, dict]]:
    return [(f"{source}: row {number}", row) for number, row in enumerate(dataset.to_list())]


def saved_dataset_rows(folder: Path, split: str | None = None) -> list[tuple[str, dict]]:
    """Rows of a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    # `datasets` takes over a second to import: only runs that read through it pay for it.
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as error:
        raise HubError(f"{folder}: not a dataset folder that save_to_disk wrote: {error}") from error
    source = f"{folder}:{split}" if split else str(folder)
    return _located(_pick_split(loaded, split, str(folder)), source)


def hub_dataset_rows(dataset_id: DatasetId, subset: str | None = None) -> list[tuple[str, dict]]:
    """Rows of a Hub dataset's split, from the datasets cache or downloaded into it."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    name = dataset_id.repo_id
    split = dataset_id.split or DEFAULT_SPLIT
    try:
        loaded = datasets.load_dataset(name, subset, split=split)
    except DatasetNotFoundError as error:
        raise HubError(f"{name} is not a local file or folder, and the Hugging Face Hub has no dataset {name} "
                       "(a private or gated one needs a login: hf auth login, or set HF_TOKEN)") from error
    except ConnectionError as error:
        reason = "downloads are off (HF_HUB_OFFLINE=1)" if is_offline_mode() else "the Hub could not be reached"
        raise HubError(
            f"{name} is not a local file or folder, nor in the datasets cache ({datasets.config.HF_DATASETS_CACHE}), "
            f"and {reason}: load it once with a network (datasets.load_dataset({name!r}"
            f"{', ' + repr(subset) if subset else ''})) into the cache this machine reads (HF_HOME or "
            "HF_DATASETS_CACHE), or give a local file"
        ) from error
    except FileNotFoundError as error:
        raise HubError(f"{name} is not a local file or folder, nor a dataset of the Hub or its cache: {error}") from error
    except ValueError as error:
        # datasets says so for an unknown split or configuration, listing the ones there are.
        raise HubError(f"{name}{':' + split}{' (data.subset ' + subset + ')' if subset else ''}: {error}") from error
    source = f"{name}:{split}" + (f" ({subset})" if subset else "")
    return _located(loaded, source)
