"""Side-by-side comparisons for `gspo-engine bench`, bench/gpu_check.py and the pytest suite in bench/."""

from gspo_engine.benchmarks.cases import ROW_FIELDS, Case, run_case
from gspo_engine.benchmarks.registry import FAMILIES, default_scale, run_benchmarks
from gspo_engine.benchmarks.table import markdown_table

__all__ = ["FAMILIES", "ROW_FIELDS", "Case", "default_scale", "markdown_table", "run_benchmarks", "run_case"]
