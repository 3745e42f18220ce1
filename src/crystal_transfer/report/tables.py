"""The study's tables from the jobs' ``test.json`` files: mean ± std over seeds and a paired test per cell.

Every number in a table comes from a job's ``test.json``; nothing is typed in except the study's published
values, which sit beside ours in their own column.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from crystal_transfer.atomic import write_text

SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Cell:
    """Test MAEs of one (source, depth) over seeds, and its paired comparison with the baseline."""

    values: dict[int, float]  # seed -> test MAE
    p_value: float | None = None  # paired t-test against the baseline over shared seeds (one-sided: lower)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values()))) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(list(self.values.values()), ddof=1)) if len(self.values) > 1 else math.nan

    @property
    def beats_baseline(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANCE

    def text(self) -> str:
        if not self.values:
            return "–"
        spread = f" ± {self.std:.3f}" if len(self.values) > 1 else ""
        mark = " *" if self.beats_baseline else ""
        return f"{self.mean:.3f}{spread}{mark}"


def read_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per job ``test.json``: source, depth, seed, test_mae and whatever else the job recorded."""
    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        record["path"] = str(path)
        rows.append(record)
    return pd.DataFrame(rows)


def paired_p_value(candidate: dict[int, float], baseline: dict[int, float],
                   alternative: str = "less") -> float | None:
    """Paired t-test over the seeds both have, one-sided (candidate MAE < baseline MAE) or, with
    ``alternative="two-sided"``, either way; None below 2 pairs."""
    seeds = sorted(set(candidate) & set(baseline))
    if len(seeds) < 2:
        return None
    a = np.array([candidate[s] for s in seeds])
    b = np.array([baseline[s] for s in seeds])
    if np.allclose(a - b, (a - b)[0]):  # constant differences: t is undefined
        if alternative == "two-sided":
            return 1.0 if np.isclose((a - b)[0], 0.0) else 0.0
        return 0.0 if (a - b)[0] < 0 else 1.0
    return float(stats.ttest_rel(a, b, alternative=alternative).pvalue)


def _seed_values(results: pd.DataFrame, source: str, depth: int) -> dict[int, float]:
    rows = results[(results["source"] == source) & (results["depth"] == depth)]
    return {int(r.seed): float(r.test_mae) for r in rows.itertuples()}


def transfer_table(
    results: pd.DataFrame,
    baseline: str,
    rows: Sequence[tuple[str, str, dict[int, float] | None]],
    depths: Sequence[int],
    published_baseline: float | None,
) -> tuple[pd.DataFrame, str]:
    """The study's layout: a baseline row, one row per source, one column per frozen depth.

    ``rows`` is (source name in the results, label shown, published values by depth or None).
    Returns the table (one column of ours and one of the study's per depth) and its Markdown.
    """
    base = _seed_values(results, baseline, 0)
    base_cell = Cell(base)
    records: list[dict[str, Any]] = []
    lines = [
        "| pretrained on | " + " | ".join(f"first {d} frozen (ours) | study" for d in depths) + " |",
        "|---|" + "---|---|" * len(depths),
    ]
    record: dict[str, Any] = {"source": "baseline (from scratch)", "n_seeds": len(base)}
    cells = []
    for depth in depths:
        record[f"mae_{depth}"] = base_cell.mean
        record[f"std_{depth}"] = base_cell.std
        record[f"study_{depth}"] = published_baseline
        record[f"p_{depth}"] = None
        cells.append(f"{base_cell.text()} | {published_baseline if published_baseline is not None else '–'}")
    records.append(record)
    lines.append("| baseline (from scratch) | " + " | ".join(cells) + " |")
    for source, label, published in rows:
        record = {"source": label}
        cells = []
        seeds: set[int] = set()
        for depth in depths:
            values = _seed_values(results, source, depth)
            seeds |= set(values)
            cell = Cell(values, paired_p_value(values, base))
            record[f"mae_{depth}"] = cell.mean
            record[f"std_{depth}"] = cell.std
            record[f"study_{depth}"] = published.get(depth) if published else None
            record[f"p_{depth}"] = cell.p_value
            study = f"{published[depth]:.3f}" if published and depth in published else "–"
            cells.append(f"{cell.text()} | {study}")
        record["n_seeds"] = len(seeds)
        records.append(record)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n_seeds = max((r["n_seeds"] for r in records), default=0)
    lines += [
        "",
        f"Test MAE (eV), mean ± std over {n_seeds} seed(s), same split for every model. "
        f"`*`: lower than the baseline in a one-sided paired t-test over seeds, p < {SIGNIFICANCE}.",
    ]
    return pd.DataFrame(records), "\n".join(lines) + "\n"


def write_table(frame: pd.DataFrame, markdown: str, csv_path: str | Path, md_path: str | Path, title: str) -> None:
    """Write a table as CSV and Markdown (atomically)."""
    write_text(csv_path, frame.to_csv(index=False))
    write_text(md_path, f"# {title}\n\n{markdown}")


# -- figures ------------------------------------------------------------------------------------------------
