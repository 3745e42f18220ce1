"""The transfer matrix: for every (source, target), the transfer mode and depth chosen on validation, its test
MAE relative to training from scratch on that target, and a paired test over seeds; and per target a table in
the form of the study's Table 2 with every mode.

The choice is the (mode, depth) with the lowest mean validation MAE over seeds (``best_val_mae`` of each job's
``test.json``); the test set never enters it. Test MAEs and their comparison with scratch are read afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from crystal_transfer.experiments.matrix import choice_text
from crystal_transfer.experiments.select import MODE_ORDER, rank_candidates
from crystal_transfer.report.tables import SIGNIFICANCE, Cell, paired_p_value, read_results


def target_runs(paths: Sequence[str]) -> pd.DataFrame:
    """One row per job of a target: source, mode, depth (frozen convs, or the feature level of atomsets), choice
    (its text), seed, test_mae, best_val_mae, unit."""
    runs = read_results(paths)
    if "level" not in runs:
        runs["level"] = None
    # the level of an atomsets run is an integer or "crystal"; columns mixing them with NaN turn them to floats
    depths = [r.level if r.mode == "atomsets" else r.depth for r in runs.itertuples()]
    runs["depth"] = pd.Series([d if isinstance(d, str) else int(d) for d in depths], index=runs.index, dtype=object)
    runs["choice"] = [choice_text(m, d) for m, d in zip(runs["mode"], runs["depth"], strict=True)]
    runs["unit"] = [units.get(target, "") for units, target in zip(runs["units"], runs["target"], strict=True)]
    return runs


def _seed_map(rows: pd.DataFrame, column: str = "test_mae") -> dict[int, float]:
    return {int(seed): float(value) for seed, value in zip(rows["seed"], rows[column], strict=True)}


def choose(runs: pd.DataFrame, source: str) -> tuple[str, pd.DataFrame] | None:
    """The choice (text) of ``source`` with the lowest mean validation MAE and its rows; None when it has no run."""
    rows = runs[runs["source"] == source]
    if rows.empty:
        return None
    choice = rank_candidates(rows).iloc[0]["choice"]
    return choice, rows[rows["choice"] == choice]


def matrix_cells(targets: Sequence[dict[str, Any]], runs_of: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (target, source) run: the choice, its validation and test MAE, and the comparison with scratch.

    ``targets``: [{split, label, sources: [{name, label}], results: [test.json paths]}] (the report spec's);
    ``runs_of``: split -> :func:`target_runs` of its results.
    """
    records = []
    for target in targets:
        runs = runs_of[target["split"]]
        scratch = runs[runs["source"] == "scratch"]
        base = _seed_map(scratch)
        base_mean = float(np.mean(list(base.values())))
        for source in target["sources"]:
            chosen = choose(runs, source["name"])
            if chosen is None:
                continue
            choice, rows = chosen
            values = _seed_map(rows)
            cell = Cell(values, paired_p_value(values, base))
            records.append({
                "target": target["split"],
                "target_label": target["label"],
                "target_title": target_title(target),
                "unit": rows["unit"].iloc[0],
                "source": source["name"],
                "source_label": source["label"],
                "mode": rows["mode"].iloc[0],
                "depth": rows["depth"].iloc[0],
                "choice": choice,
                "candidates": int(runs[runs["source"] == source["name"]]["choice"].nunique()),
                "n_seeds": len(cell.values),
                "val_mae": float(rows["best_val_mae"].mean()),
                "test_mae": cell.mean,
                "test_std": cell.std,
                "scratch_test_mae": base_mean,
                "relative_change": cell.mean / base_mean - 1.0,
                "p_value": cell.p_value,
                "better_than_scratch": cell.beats_baseline,
            })
    return pd.DataFrame(records)


def target_table(runs: pd.DataFrame, sources: Sequence[dict[str, Any]], label: str) -> tuple[pd.DataFrame, str]:
    """Table 2's form for one target: the baseline row, one row per source, one column per (mode, depth) run;
    the cell chosen on validation is bold."""
    choices = sorted(runs[runs["source"] != "scratch"][["mode", "depth", "choice"]].drop_duplicates().itertuples(),
                     key=lambda r: (MODE_ORDER[r.mode], str(r.depth)))
    columns = [c.choice for c in choices]
    base = _seed_map(runs[runs["source"] == "scratch"])
    unit = runs["unit"].iloc[0]
    lines = ["| pretrained on | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    base_cell = Cell(base)
    records = [{"source": "baseline (from scratch)", "chosen": None,
                **{f"mae {c}": base_cell.mean for c in columns}}]
    lines.append("| baseline (from scratch) | " + " | ".join(base_cell.text() for _ in columns) + " |")
    for source in sources:
        picked = choose(runs, source["name"])
        record: dict[str, Any] = {"source": source["label"], "chosen": picked[0] if picked else None}
        cells = []
        for column in columns:
            rows = runs[(runs["source"] == source["name"]) & (runs["choice"] == column)]
            values = _seed_map(rows)
            cell = Cell(values, paired_p_value(values, base))
            record[f"mae {column}"], record[f"std {column}"] = cell.mean, cell.std
            record[f"val {column}"] = float(rows["best_val_mae"].mean()) if len(rows) else math.nan
            record[f"p {column}"] = cell.p_value
            text = cell.text()
            cells.append(f"**{text}**" if picked and picked[0] == column else text)
        records.append(record)
        lines.append(f"| {source['label']} | " + " | ".join(cells) + " |")
    n_seeds = runs.groupby(["source", "choice"])["seed"].nunique().max()
    lines += [
        "",
        f"{label} test MAE ({unit or 'no unit'}), mean ± std over {n_seeds} seed(s), one split. "
        "freeze k: embedding and first k conv layers frozen, the rest re-initialised; "
        "fine-tune: every layer trained; AtomSets Lk: a set model on the frozen features at level k. "
        "**Bold**: the source's choice, the lowest mean validation MAE (the test set takes no part in it). "
        "`*`: lower than the baseline in a one-sided paired t-test over seeds, "
        f"p < {SIGNIFICANCE}.",
    ]
    return pd.DataFrame(records), "\n".join(lines) + "\n"


def matrix_markdown(cells: pd.DataFrame) -> str:
    """The matrix as a table: one line per (target, source) cell."""
    lines = ["| target | source | chosen (lowest val MAE) | val MAE | test MAE | scratch | change | p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in cells.itertuples():
        p = f"{r.p_value:.3g}" if r.p_value is not None and r.p_value == r.p_value else "–"
        lines.append(f"| {r.target_title} ({r.unit or 'no unit'}) | {r.source_label} | {r.choice} | {r.val_mae:.3f} | "
                     f"{r.test_mae:.3f} ± {r.test_std:.3f} | {r.scratch_test_mae:.3f} | "
                     f"{100 * r.relative_change:+.1f} %{' *' if r.better_than_scratch else ''} | {p} |")
    return "\n".join(lines) + (f"\n\n`*`: lower than scratch in a one-sided paired t-test over seeds, "
                               f"p < {SIGNIFICANCE}.\n")


def target_title(target: dict[str, Any]) -> str:
    """A target as headings name it: its split plan in words, and the label where that differs."""
    words = target["split"].replace("_", " ")
    return words if target["label"].replace("_", " ") == words else f"{words} ({target['label']})"


def matrix_figure(cells: pd.DataFrame, targets: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]],
                  path: str) -> None:
    """Sources as rows, targets as columns; colour and first line the chosen run's test MAE relative to scratch
    (diverging, centred on no change), second line the choice, ``*`` where it beats scratch (p < 0.05)."""
    from matplotlib.colors import TwoSlopeNorm

    from crystal_transfer.report.figures import _pyplot, _save

    plt = _pyplot()
    values = np.full((len(sources), len(targets)), np.nan)
    text = [["not run"] * len(targets) for _ in sources]
    for i, source in enumerate(sources):
        for j, target in enumerate(targets):
            row = cells[(cells["source"] == source["name"]) & (cells["target"] == target["split"])]
            if row.empty:
                continue
            r = row.iloc[0]
            values[i, j] = 100.0 * r.relative_change
            text[i][j] = f"{values[i, j]:+.0f} %{' *' if r.better_than_scratch else ''}\n{r.choice}"
    limit = max(5.0, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 5.0)
    fig, ax = plt.subplots(figsize=(1.9 * len(targets) + 3.2, 0.62 * len(sources) + 2.0))
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("0.9")  # not run: grey, apart from the white of "no change"
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=TwoSlopeNorm(0.0, -limit, limit),
                      aspect="auto")
    for i in range(len(sources)):
        for j in range(len(targets)):
            strong = np.isfinite(values[i, j]) and abs(values[i, j]) > 0.6 * limit
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8,
                    color="white" if strong else ("0.45" if not np.isfinite(values[i, j]) else "black"))
    columns = []
    for target in targets:
        row = cells[cells["target"] == target["split"]]
        scratch = f"\nscratch {row['scratch_test_mae'].iloc[0]:.3g} {row['unit'].iloc[0]}".rstrip() if len(row) else ""
        columns.append(target_title(target) + scratch)
    ax.set_xticks(range(len(targets)), columns, fontsize=8)
    ax.set_yticks(range(len(sources)), [s["label"] for s in sources], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("test MAE relative to scratch (%)", fontsize=8)
    ax.set_title("Transfer matrix: test MAE of each source's run chosen on validation, relative to training "
                 f"from scratch\n(blue: better; * paired t-test over seeds, p < {SIGNIFICANCE}; the scratch MAE "
                 "is in the target's units)", fontsize=9, pad=12)
    _save(fig, path)
