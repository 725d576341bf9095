"""Pushing an exported model folder to the Hugging Face Hub (huggingface_hub's create_repo + upload_folder)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError

from gspo_engine.hub.names import HubError, parse_model_id


def check_push_target(repo_id: str) -> None:
    """Refuse a repository name the Hub would refuse, or an upload the offline mode forbids, before exporting."""
    model_id = parse_model_id(repo_id)
    if model_id is None or model_id.revision:
        raise HubError(f"--push-to-hub: {repo_id!r} is not a repository id; write ORG/NAME (or USER/NAME)")
    if is_offline_mode():
        raise HubError("--push-to-hub: HF_HUB_OFFLINE=1 forbids uploads; unset it to push")


def push_folder(folder: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload every file of `folder` to the model repository `repo_id` (created when missing, private unless
    `private` is false; an existing repository keeps its visibility); returns the commit's URL."""
    check_push_target(repo_id)
    api = HfApi()  # the token of `hf auth login` or HF_TOKEN
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=f"Upload {Path(folder).name} exported by gspo-engine")
    except HfHubHTTPError as error:
        raise HubError(f"--push-to-hub {repo_id}: {error}") from error
    return commit.commit_url
