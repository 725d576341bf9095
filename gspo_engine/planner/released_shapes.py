"""Model shapes for the planner, from config.json alone: the model folder's, an embedded tiny model's, the
Hugging Face cache's copy for a Hub id (nothing is downloaded), or, when none is on this machine and the name
is a released Qwen3 model, that release's published config.json (gspo_engine/released_models.py), so a plan
can be made before downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from gspo_engine.hf_checkpoint import CONFIG_FILE
from gspo_engine.hub import cached_model_config, parse_model_id
from gspo_engine.model import ModelArgs
from gspo_engine.released_models import RELEASED_SHAPES, released_hint
from gspo_engine.tiny import TINY_MODELS, tiny_model_args

__all__ = ["RELEASED_SHAPES", "plan_model_args"]


def plan_model_args(name_or_path: str) -> tuple[ModelArgs, str]:
    """The shapes of `model.name_or_path` and where they come from, as the plan prints it."""
    if name_or_path in TINY_MODELS:
        return tiny_model_args(name_or_path), f"{name_or_path} (embedded, random)"
    folder = Path(name_or_path)
    if (folder / CONFIG_FILE).is_file():
        return ModelArgs.from_hf_config(json.loads((folder / CONFIG_FILE).read_text())), str(folder)
    model_id = parse_model_id(name_or_path)
    if model_id is not None:
        cached = cached_model_config(model_id)
        if cached is not None:
            return ModelArgs.from_hf_config(json.loads(cached.read_text())), (
                f"{name_or_path} (config.json in the Hugging Face cache: {cached.parent})"
            )
    name = model_id.name if model_id is not None else folder.name
    if name in RELEASED_SHAPES:
        return ModelArgs.from_hf_config(RELEASED_SHAPES[name]), (
            f"{name_or_path} (not on this machine: shapes of the released {name})"
        )
    hint = ""
    if model_id is not None:
        # A name that was never released gets real ones; a real one is planned from its config.json alone.
        hint = released_hint(model_id.repo_id) or (
            f"its config.json alone is enough to plan it: hf download {model_id.repo_id} {CONFIG_FILE}"
        )
    raise ValueError(
        f"model.name_or_path: {name_or_path} has no config.json here or in the Hugging Face cache and is not a "
        f"released model this planner knows ({', '.join(RELEASED_SHAPES)}) nor an embedded one "
        f"({', '.join(TINY_MODELS)})" + (f"; {hint}" if hint else "")
    )
