"""The memory planner behind `gspo-engine plan` and `train --dry-run`: what a config will do and the memory
it needs per GPU, from config.json alone (no weights are read).

released_shapes.py finds the model's shapes (its folder's config.json, an embedded tiny model, or a
released Qwen3 model's published config.json); activations.py weighs a micro-batch's tensors per
token; memory_model.py adds up each phase of a step per GPU and finds the largest micro-batch that
fits; report.py holds the Plan and prints it; plan.py's make_plan puts them together. docs/planner.md
gives the formulas.
"""

from gspo_engine.planner.memory_model import Cluster, MemoryPlan
from gspo_engine.planner.plan import make_plan
from gspo_engine.planner.released_shapes import RELEASED_SHAPES, plan_model_args
from gspo_engine.planner.report import Plan

__all__ = ["RELEASED_SHAPES", "Cluster", "MemoryPlan", "Plan", "make_plan", "plan_model_args"]
