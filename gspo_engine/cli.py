"""The `gspo-engine` command line."""

from __future__ import annotations

import json

import click

from gspo_engine import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gspo-engine")
def main() -> None:
    """GSPO reinforcement-learning fine-tuning of Qwen3 models."""


def _format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


@main.command()
@click.option("--kernel", "kernels", multiple=True, help="Kernel family to compare (repeatable; default: all).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--rounds", default=10, show_default=True, type=click.IntRange(1), help="Timed calls per case.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of a table.")
def bench(kernels: tuple[str, ...], device: str | None, rounds: int, as_json: bool) -> None:
    """Time our kernels side by side with the plain PyTorch reference."""
    import torch

    from gspo_engine.benchmarks import KERNELS, run_kernel_benchmarks

    unknown = [name for name in kernels if name not in KERNELS]
    if unknown:
        raise click.BadParameter(f"unknown kernel {unknown[0]!r}; choose from {', '.join(KERNELS)}", param_hint="--kernel")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("cuda was asked for but no GPU is visible", param_hint="--device")
    rows = run_kernel_benchmarks(list(kernels) or list(KERNELS), target, rounds)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    columns = list(rows[0]) if rows else []
    table = [columns] + [[_format_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
