"""The Hugging Face Hub and its caches: models by `ORG/NAME[@REVISION]` (models.py), prompt datasets saved
with `save_to_disk` or named on the Hub (dataset_rows.py), pushing an exported model (upload.py); names.py
parses the ids. Everything goes through huggingface_hub and datasets, so HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE and tokens work as in every Hugging Face tool."""

from gspo_engine.hub.dataset_rows import hub_dataset_rows, is_saved_dataset, saved_dataset_rows
from gspo_engine.hub.models import MODEL_FILES, ResolvedModel, cached_model_config, download_model
from gspo_engine.hub.names import DatasetId, HubError, ModelId, parse_dataset_id, parse_model_id
from gspo_engine.hub.upload import check_push_target, push_folder

__all__ = [
    "MODEL_FILES", "DatasetId", "HubError", "ModelId", "ResolvedModel", "cached_model_config", "check_push_target",
    "download_model", "hub_dataset_rows", "is_saved_dataset", "parse_dataset_id", "parse_model_id", "push_folder",
    "saved_dataset_rows",
]
