"""Rows (see gspo_engine.benchmarks.cases) as one markdown table, the same in every report."""

from __future__ import annotations

HEADER = ("kernel", "case", "implementation", "median ms", "peak MiB", "throughput", "of ceiling", "vs reference",
          "status")


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _cells(row: dict) -> list[str]:
    throughput = "-" if row["throughput"] is None else f"{_number(row['throughput'])} {row['unit']}"
    fraction = "-" if row["fraction_of_ceiling"] is None else f"{row['fraction_of_ceiling']:.1%}"
    ratio = "-" if row["vs_reference"] is None else f"{row['vs_reference']:.2f}x"
    status = row["status"] if not row["note"] else f"{row['status']}: {row['note']}"
    return [row["kernel"], row["case"], row["implementation"], _number(row["median_ms"], 4),
            _number(row["peak_mib"], 4), throughput, fraction, ratio, status.replace("|", "/").replace("\n", " ")]


def markdown_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return lines
