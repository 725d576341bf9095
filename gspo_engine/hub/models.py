"""Models by their Hub id: `ORG/NAME[@REVISION]` downloaded with huggingface_hub into its cache (HF_HOME,
HF_HUB_CACHE, tokens and progress bars as every Hugging Face tool has them), only the files a run reads.

Offline (HF_HUB_OFFLINE=1, or no network) a cached snapshot is used as it is; a model missing from the
cache, a name the Hub does not know or a revision it lacks is a HubError that says what to do, naming the
closest released models for a Qwen/ name that was never released.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, is_offline_mode, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from gspo_engine.hf_checkpoint import CONFIG_FILE, COPIED_FILES, INDEX_FILE
from gspo_engine.hub.names import HubError, ModelId
from gspo_engine.released_models import released_hint
from gspo_engine.tokenizer import VOCABULARY_FILES

# What the multimodal families (Qwen3-VL, Qwen3-Omni) add for their processors.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")
# The files a run reads (hf_checkpoint.py reads model.safetensors or the index and its shards), as
# snapshot_download's allow_patterns: the rest of a repository (other formats, originals) stays on the Hub.
MODEL_FILES: tuple[str, ...] = tuple(dict.fromkeys(
    (CONFIG_FILE, INDEX_FILE, "model*.safetensors", *COPIED_FILES, *VOCABULARY_FILES, *PROCESSOR_FILES)
))


@dataclass(frozen=True)
class ResolvedModel:
    """Where a run's model is read from, and for a Hub id the repository and the commit read."""

    folder: Path
    repo_id: str | None = None  # None: a local folder
    revision: str | None = None  # the commit of the snapshot


def model_revision(model_id: ModelId, revision: str | None) -> str | None:
    """The revision asked for: ORG/NAME@REVISION or model.revision (the same one, when both are given)."""
    if revision and model_id.revision and revision != model_id.revision:
        raise HubError(f"model.name_or_path {model_id} and model.revision {revision} name two revisions; give one")
    return model_id.revision or revision


def download_model(model_id: ModelId, revision: str | None = None) -> ResolvedModel:
    """The snapshot folder of `model_id` in the Hugging Face cache, downloaded first when it is not there
    (with huggingface_hub's progress bars). `revision` is model.revision."""
    revision = model_revision(model_id, revision)
    repo_id = model_id.repo_id
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES)))
    except RevisionNotFoundError as error:
        raise HubError(f"model.revision: {revision} is not a branch, tag or commit of {repo_id} on the Hub") from error
    except GatedRepoError as error:
        raise HubError(f"model.name_or_path: {repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} "
                       "and log in (hf auth login, or set HF_TOKEN)") from error
    except RepositoryNotFoundError as error:
        hint = released_hint(repo_id)
        raise HubError(
            f"model.name_or_path: the Hugging Face Hub has no model {repo_id}"
            + (f". {hint}" if hint else " (a private one needs a login: hf auth login, or set HF_TOKEN)")
        ) from error
    except IncompleteSnapshotError as error:
        raise HubError(f"model.name_or_path: {error}") from error
    except LocalEntryNotFoundError as error:
        raise HubError(not_cached_message(repo_id, revision)) from error
    except HfHubHTTPError as error:
        raise HubError(f"model.name_or_path: downloading {ModelId(repo_id, revision)} failed: {error}") from error
    return ResolvedModel(folder, repo_id, folder.name)  # the cache names a snapshot folder by its commit


def not_cached_message(repo_id: str, revision: str | None) -> str:
    """Why a model missing from the cache could not be downloaded, and how to get it."""
    asked = ModelId(repo_id, revision)
    reason = ("downloads are off (HF_HUB_OFFLINE=1)" if is_offline_mode()
              else "the Hugging Face Hub could not be reached")
    hint = released_hint(repo_id)
    if hint:
        return f"model.name_or_path: {asked} is not in the Hugging Face cache and {reason}. {hint}"
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return (
        f"model.name_or_path: {asked} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}. "
        f"Download it where there is a network (`{command}`, or this run without HF_HUB_OFFLINE) into the cache "
        f"this machine reads (HF_HOME or HF_HUB_CACHE), or give the model's local folder"
    )


def cached_model_config(model_id: ModelId) -> Path | None:
    """config.json of `model_id` when the Hugging Face cache holds it (nothing is downloaded), else None."""
    found = try_to_load_from_cache(model_id.repo_id, CONFIG_FILE, revision=model_id.revision)
    return Path(found) if isinstance(found, str) else None
