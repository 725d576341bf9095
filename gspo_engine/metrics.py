"""Per-step metrics: one console line, one JSON line in metrics.jsonl, TensorBoard on request, curves.png at the end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Console columns: (metric key, label, format).
_CONSOLE = [
    ("reward_mean", "reward", "{:.3f}"),
    ("reward_std", "±", "{:.3f}"),
    ("response_len_mean", "len", "{:.1f}"),
    ("clip_frac", "clip", "{:.3f}"),
    ("ratio_mean", "ratio", "{:.4f}"),
    ("loss", "loss", "{:+.4f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("lr", "lr", "{:.2e}"),
    ("rollout_tokens_per_s", "roll tok/s", "{:.0f}"),
    ("rollout_active_mean", "active", "{:.1f}"),
    ("rollout_active_min", "min", "{:.0f}"),
    ("kv_cache_use", "kv use", "{:.0%}"),
    ("update_tokens_per_s", "upd tok/s", "{:.0f}"),
    ("peak_memory_mib", "mem MiB", "{:.0f}"),
    ("expert_imbalance", "moe max/mean", "{:.2f}"),
]

CURVES = [("reward_mean", "reward"), ("response_len_mean", "response length"), ("clip_frac", "clip fraction"), ("loss", "loss")]


def console_line(step: int, metrics: dict[str, Any]) -> str:
    parts = [f"step {step}"]
    for key, label, fmt in _CONSOLE:
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


class MetricsLog:
    """Appends one JSON object per step to output_dir/metrics.jsonl (and TensorBoard when asked)."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = False, resume_step: int | None = None):
        """A fresh log, or with resume_step the existing one cut back to the steps up to resume_step
        (steps logged after the checkpoint a run resumes from are run again)."""
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        kept = [r for r in self.records() if r["step"] <= resume_step] if resume_step is not None else []
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError("logging.tensorboard needs the tensorboard package (pip install tensorboard)") from error
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step} | {k: _plain(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> Path | None:
        """Flush TensorBoard and draw curves.png from every record of the run."""
        if self.writer is not None:
            self.writer.close()
        return plot_curves(self.records(), self.output_dir / "curves.png")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for axis, (key, title) in zip(axes.flat, CURVES):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), marker="." if len(points) < 50 else None)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@dataclass
class TrainSummary:
    steps: int
    window: int  # steps averaged at each end: 10, or half the run when it is shorter
    first_reward_mean: float
    last_reward_mean: float
    skipped_updates: int
    output_dir: Path
    final_dir: Path


def summarize(records: list[dict[str, Any]], skipped_updates: int, output_dir: Path, final_dir: Path) -> TrainSummary:
    """The run's mean reward over its first and last steps, from metrics.jsonl's records."""
    rewards = [r["reward_mean"] for r in records]
    window = min(10, max(1, len(rewards) // 2))
    first = sum(rewards[:window]) / window if rewards else float("nan")
    last = sum(rewards[-window:]) / window if rewards else float("nan")
    return TrainSummary(len(rewards), window, first, last, skipped_updates, output_dir, final_dir)
