"""Side-by-side kernel comparisons for `gspo-engine bench` and the pytest-benchmark suite in bench/."""

from gspo_engine.benchmarks.registry import KERNELS, run_kernel_benchmarks

__all__ = ["KERNELS", "run_kernel_benchmarks"]
