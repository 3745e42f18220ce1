"""The learning-curve table: test MAE per curve and training size on one shared test set, and the best curve at
each size with a paired test against the runner-up.

A universal potential may reject a few crystals (an element it lacks, an atom alone within its cut-off), so
its runs predict a subset of the test set. Every MAE here is therefore recomputed from the runs'
``predictions.csv`` on the test crystals that every run predicted, and the table says how many were left out;
the MAE each run recorded on its own test set stays in the CSV beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crystal_transfer.experiments.fit import PREDICTIONS_FILE
from crystal_transfer.report.tables import SIGNIFICANCE, Cell, paired_p_value, read_results


def curve_points(curves: Sequence[dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per run (curve key, label, mode, train_size, seed, test_mae on the shared test crystals,
    own_test_mae, n_test), and what the shared test set is (size, crystals left out and by which curves)."""
    frames, predicted = [], {}
    for curve in curves:
        runs = read_results(curve["results"])
        runs["key"], runs["label"], runs["curve_mode"] = curve["key"], curve["label"], curve["mode"]
        frames.append(runs)
        for path in runs["path"]:
            predictions = pd.read_csv(Path(path).with_name(PREDICTIONS_FILE))
            predicted[path] = predictions.set_index("id")
    runs = pd.concat(frames, ignore_index=True)
    all_ids = set().union(*(set(p.index) for p in predicted.values()))
    shared = set.intersection(*(set(p.index) for p in predicted.values()))
    left_out_by = {
        key: len(all_ids - set().union(*(set(predicted[p].index) for p in group["path"])))
        for key, group in runs.groupby("key")
    }
    order = sorted(shared)
    maes = []
    for path in runs["path"]:
        frame = predicted[path].loc[order]
        maes.append(float(np.abs(frame["prediction"] - frame["target"]).mean()))
    runs["own_test_mae"] = runs["test_mae"]
    runs["test_mae"] = maes
    runs["n_test"] = len(order)
    about = {"n_test": len(order), "n_left_out": len(all_ids) - len(order),
             "left_out_by": {k: v for k, v in left_out_by.items() if v}}
    return runs, about


def curves_table(runs: pd.DataFrame, about: dict[str, Any], unit: str) -> tuple[pd.DataFrame, str, list[dict]]:
    """Rows: curves (in plan order); columns: training sizes, mean ± std over seeds. Then, per size, the curve
    with the lowest test MAE and a two-sided paired t-test over seeds against the runner-up: the ranking is made
    after seeing the test MAEs, so the test only says whether the two could be told apart."""
    sizes = sorted(int(n) for n in runs["train_size"].unique())
    keys = list(dict.fromkeys(runs["key"]))
    label = dict(zip(runs["key"], runs["label"], strict=False))
    cells = {
        (key, size): Cell({int(r.seed): float(r.test_mae) for r in group.itertuples()})
        for (key, size), group in runs.groupby(["key", "train_size"])
    }
    records, lines = [], [
        "| curve | " + " | ".join(f"{n:,} training crystals" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for key in keys:
        record: dict[str, Any] = {"curve": key, "label": label[key]}
        texts = []
        for size in sizes:
            cell = cells.get((key, size), Cell({}))
            record[f"mae_{size}"], record[f"std_{size}"] = cell.mean, cell.std
            record[f"seeds_{size}"] = len(cell.values)
            texts.append(cell.text())
        records.append(record)
        lines.append(f"| {label[key]} | " + " | ".join(texts) + " |")
    best = []
    for size in sizes:
        ranked = sorted((cells[(key, size)].mean, key) for key in keys if (key, size) in cells)
        if not ranked:
            continue
        entry: dict[str, Any] = {"train_size": size, "best": ranked[0][1], "best_label": label[ranked[0][1]],
                                 "best_mae": ranked[0][0], "runner_up": None, "p_value": None}
        if len(ranked) > 1:
            first, second = cells[(ranked[0][1], size)], cells[(ranked[1][1], size)]
            entry.update(runner_up=ranked[1][1], runner_up_label=label[ranked[1][1]], runner_up_mae=ranked[1][0],
                         p_value=paired_p_value(first.values, second.values, "two-sided"))
        best.append(entry)
    seeds = sorted({int(n) for n in runs.groupby(["key", "train_size"])["seed"].nunique()})
    spread = "–".join(map(str, sorted({seeds[0], seeds[-1]})))
    lines += ["", f"Test MAE ({unit}), mean ± std over {spread} seed{'s' if seeds[-1] > 1 else ''}, "
              f"on the {about['n_test']:,} test crystals every curve predicted."]
    if about["n_left_out"]:
        by = ", ".join(f"{label[k]}: {v}" for k, v in about["left_out_by"].items())
        lines.append(f"{about['n_left_out']} test crystals are left out of every MAE because a source could not "
                     f"featurise them ({by}); each run's MAE on its own test set is in the CSV (own_test_mae).")
    lines += ["", "Lowest test MAE at each training size, ranked after the fact (descriptive: two-sided paired t-test "
              "over seeds against the runner-up, no correction for the number of sizes):", ""]
    for entry in best:
        if entry["runner_up"] is None:
            lines.append(f"- {entry['train_size']:,}: {entry['best_label']} ({entry['best_mae']:.3f} {unit}), alone")
            continue
        p = entry["p_value"]
        if p is None:
            verdict = "no paired test (fewer than 2 shared seeds)"
        else:
            verdict = f"p = {p:.3g}, {'significant' if p < SIGNIFICANCE else 'not significant'} at {SIGNIFICANCE}"
        lines.append(f"- {entry['train_size']:,}: {entry['best_label']} ({entry['best_mae']:.3f} {unit}) ahead of "
                     f"{entry['runner_up_label']} ({entry['runner_up_mae']:.3f}); {verdict}")
    return pd.DataFrame(records), "\n".join(lines) + "\n", best
