"""The ``select`` stage: the best transferred model of a target, chosen on validation only, as a seed ensemble.

Every (source, mode, depth) run of a target (the transfer matrix's jobs, scratch included) is a candidate; the
one with the lowest mean validation MAE over its seeds (``best_val_mae`` of each job's ``test.json``, the epoch
the trainer kept) is chosen, ties broken by the mode order freeze, finetune, atomsets, scratch and then by name.
Test MAEs are read only after the choice, to report it. ``results/best/<split>/`` then holds:

- ``members/seed<k>/``: each seed's saved model (a set model's source trunk in ``source/`` when it is a CGCNN
  model; a universal potential is named by its kind);
- ``model_card.json``: what was chosen, every candidate's validation MAE (and, after the fact, test MAE), the test
  MAE of the chosen members and of their ensemble mean, the data fingerprint, graph settings and units;
- ``test_predictions.csv``: per test crystal the target, the ensemble mean and spread (std over the members);
- ``parity.png`` (ensemble mean against the label) and ``calibration.png`` (test |error| against the ensemble's
  std, binned), in the units of the MAE (log10 for a target learned on log10).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crystal_transfer.atomic import write_csv, write_json
from crystal_transfer.errors import InputError
from crystal_transfer.experiments.features import set_model_source
from crystal_transfer.experiments.matrix import MODES, choice_text
from crystal_transfer.report.figures import ensemble_figures

ENSEMBLE_FORMAT = "crystal_transfer.ensemble"
ENSEMBLE_CARD = "model_card.json"
MODE_ORDER = {mode: index for index, mode in enumerate((*MODES, "scratch"))}
CALIBRATION_BINS = 5


def read_runs(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per job ``test.json``: source, mode, depth (frozen convolutions, or an atomsets run's feature
    level), choice (its text), seed, best_val_mae, test_mae, unit, and the job's folder."""
    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        mode = record.get("mode", "freeze")
        depth = record.get("level") if mode == "atomsets" else record.get("depth", 0)
        target = record.get("target")
        rows.append({
            "source": record["source"], "mode": mode, "depth": depth if isinstance(depth, str) else int(depth),
            "choice": choice_text(mode, depth), "seed": int(record["seed"]), "target": target,
            "best_val_mae": float(record["best_val_mae"]), "test_mae": float(record["test_mae"]),
            "unit": record.get("units", {}).get(target, ""), "run_dir": str(Path(path).parent),
            # validation crystals a universal potential could not featurise (AtomSets only): its MAE is over the rest
            "val_left_out": int(record.get("left_out", {}).get("val", 0)),
        })
    return pd.DataFrame(rows)


def rank_candidates(runs: pd.DataFrame) -> pd.DataFrame:
    """The candidates (source, choice) of ``runs`` ordered best first on validation alone: mean ``best_val_mae``
    over seeds, then the mode order, then names. Columns: source, mode, depth, choice, val_mae, val_std, seeds."""
    if runs.empty:
        raise InputError("no runs to choose from")
    groups = runs.groupby(["source", "choice"], sort=False)
    left_out = {"val_left_out": ("val_left_out", "max")} if "val_left_out" in runs else {}
    table = groups.agg(mode=("mode", "first"), depth=("depth", "first"), val_mae=("best_val_mae", "mean"),
                       val_std=("best_val_mae", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0),
                       seeds=("seed", lambda s: sorted(int(x) for x in s)), **left_out).reset_index()
    table["order"] = [MODE_ORDER[mode] for mode in table["mode"]]
    return table.sort_values(["val_mae", "order", "source", "choice"]).drop(columns="order").reset_index(drop=True)


def _members_predictions(chosen: pd.DataFrame) -> pd.DataFrame:
    """Test predictions of every member, one column per seed (``seed<k>``), with the label, aligned by id."""
    frames = []
    for row in chosen.itertuples():
        frame = pd.read_csv(Path(row.run_dir) / "predictions.csv")
        frames.append(frame.set_index("id")[["target", "prediction"]].rename(columns={"prediction": f"seed{row.seed}"}))
    merged = frames[0]
    for frame in frames[1:]:  # a crystal a set model's source left out is not in every member's file
        merged = merged.join(frame.drop(columns="target"), how="inner")
    return merged


def calibration_bins(error: np.ndarray, spread: np.ndarray, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Test crystals in ``bins`` equal-count bins of ensemble std: per bin the mean std, the mean |error| and the
    root-mean-square error, and the count."""
    order = np.argsort(spread, kind="stable")
    rows = []
    for part in np.array_split(order, min(bins, len(order))):
        rows.append({"std": float(spread[part].mean()), "mae": float(np.abs(error[part]).mean()),
                     "rmse": float(np.sqrt((error[part] ** 2).mean())), "count": len(part)})
    return pd.DataFrame(rows)


def _depth(depth: Any) -> int | str:
    return depth if isinstance(depth, str) else int(depth)


def _copy_member(run_dir: str, dest: Path) -> dict[str, Any]:
    card = json.loads((Path(run_dir) / "model" / "model.json").read_text())
    shutil.copytree(Path(run_dir) / "model", dest)
    return card


def run(name: str, results: Sequence[str | Path], out: str | Path, label: str = "", log=print) -> dict[str, Any]:
    """The ``select`` stage: choose the best (source, mode, depth) of target ``name`` among the jobs ``results``
    on validation and write the ensemble of its seeds into ``out``; returns the card."""
    # long: the choice, the members, their test figures and the card are written in one place, card last
    # built beside the folder and swapped in whole, so an interrupted run leaves the previous choice intact
    final = Path(out)
    out = final.parent / f".{final.name}.partial"
    shutil.rmtree(out, ignore_errors=True)
    runs = read_runs(results)
    ranked = rank_candidates(runs)
    best = ranked.iloc[0]
    chosen = runs[(runs["source"] == best["source"]) & (runs["choice"] == best["choice"])].sort_values("seed")
    out.mkdir(parents=True)
    members, member_cards = [], []
    for row in chosen.itertuples():
        member_cards.append(_copy_member(row.run_dir, out / "members" / f"seed{row.seed}"))
        members.append({"seed": int(row.seed), "path": f"members/seed{row.seed}"})
    inputs = member_cards[0].get("inputs")
    source: dict[str, Any] | None = None
    if inputs:  # a set model on frozen features: it needs its source to featurise new crystals
        found = set_model_source(inputs)
        if isinstance(found, Path):
            shutil.copytree(found, out / "source")
            source = {"kind": "cgcnn", "path": "source", "level": inputs["level"]}
        else:
            source = {"kind": found, "level": inputs["level"]}
    predictions = _members_predictions(chosen)
    seeds = [c for c in predictions.columns if c.startswith("seed")]
    values = predictions[seeds].to_numpy()
    frame = pd.DataFrame({"id": predictions.index, "target": predictions["target"].to_numpy(),
                          "prediction": values.mean(1), "std": values.std(1)})
    error = (frame["prediction"] - frame["target"]).to_numpy()
    bins = calibration_bins(error, frame["std"].to_numpy())
    unit = str(chosen["unit"].iloc[0] or "")
    write_csv(out / "test_predictions.csv", ["id", "target", "prediction", "std"],
              [(i, f"{t:.6g}", f"{p:.6g}", f"{s:.6g}") for i, t, p, s in frame.itertuples(index=False)])
    title = f"{label or name}: {best['source']}, {best['choice']} ({len(members)} seeds)"
    ensemble_figures(frame, bins, out / "parity.png", out / "calibration.png", title, unit, label or name)
    test_by_candidate = runs.groupby(["source", "choice"])["test_mae"].mean()
    card = {
        "format": ENSEMBLE_FORMAT,
        "format_version": 1,
        "target": chosen["target"].iloc[0],
        "split": name,
        "unit": unit,
        "chosen": {"source": best["source"], "mode": best["mode"], "depth": _depth(best["depth"]),
                   "choice": best["choice"], "val_mae": float(best["val_mae"]), "val_std": float(best["val_std"])},
        "selection": "lowest mean validation MAE over seeds (best_val_mae of each run); the test set took no part",
        "members": members,
        "source": source,
        "candidates": [
            {"source": r.source, "mode": r.mode, "depth": _depth(r.depth), "choice": r.choice,
             "val_mae": float(r.val_mae), "val_std": float(r.val_std), "seeds": list(r.seeds),
             "val_crystals_left_out": int(r.val_left_out),
             "test_mae_after_the_fact": float(test_by_candidate[(r.source, r.choice)])}
            for r in ranked.itertuples()
        ],
        "test": {"n_crystals": len(frame), "ensemble_mae": float(np.abs(error).mean()),
                 "member_mae_mean": float(chosen["test_mae"].mean()),
                 "member_mae_std": float(chosen["test_mae"].std(ddof=1)) if len(chosen) > 1 else 0.0,
                 "calibration": json.loads(bins.to_json(orient="records"))},
        "data_fingerprint": [c.get("data_fingerprint") for c in member_cards],
        "graph_settings": member_cards[0].get("graph_settings"),
        "normalizer": member_cards[0]["normalizers"],
    }
    write_json(out / ENSEMBLE_CARD, card)
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    log(f"{name}: chose {best['source']} {best['choice']} (validation MAE {best['val_mae']:.4f} {unit}, "
        f"{len(members)} seeds, among {len(ranked)} candidates); ensemble test MAE {card['test']['ensemble_mae']:.4f}")
    return card
