"""The ``report`` stage: Tables 2 and 3 of the study and the figures, from the files the training jobs write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from crystal_transfer.atomic import write_json
from crystal_transfer.report import study
from crystal_transfer.report.curves import curve_points, curves_table
from crystal_transfer.report.figures import (
    attention_figure,
    learning_curves_figure,
    loss_curves_figure,
    parity_figure,
)
from crystal_transfer.report.matrix import (
    matrix_cells,
    matrix_figure,
    matrix_markdown,
    target_runs,
    target_table,
    target_title,
)
from crystal_transfer.report.tables import read_results, transfer_table, write_table


def build_report(spec: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write Tables 2 and 3, Figures 5 and 6, the parity plot, the transfer matrix and the per-target tables from
    the jobs' files named in ``spec``.

    ``spec``: ``results`` (the study target's freeze and baseline test.json), ``sources`` ([{name, label,
    role}]), ``depths``, ``figure_depth``, ``table3`` ({combined, formation_energy, sizes} or null), ``figure6``
    ({gated, attention: pretrain folders} or null), ``curves``, ``targets`` ([{split, label, sources, results}]).
    """
    out = Path(out_dir)
    results = read_results(spec["results"])
    spec = {**spec, "target_unit": results["units"].iloc[0].get(results["target"].iloc[0], "")}
    summary = _tables(spec, results, out)
    _figures(spec, results, out, summary)
    if spec.get("targets"):
        summary["matrix"] = _matrix(spec["targets"], out)
    write_json(out / "summary.json", summary)
    return summary


def _matrix(targets: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """The transfer matrix (PNG, CSV, Markdown) and each target's table under ``targets/``."""
    runs_of = {target["split"]: target_runs(target["results"]) for target in targets}  # each test.json read once
    cells = matrix_cells(targets, runs_of)
    sources = list({s["name"]: s for target in targets for s in target["sources"]}.values())
    matrix_figure(cells, targets, sources, str(out / "transfer_matrix.png"))
    write_table(cells, matrix_markdown(cells), out / "transfer_matrix.csv", out / "transfer_matrix.md",
                "Transfer matrix: each source's run chosen on validation, test MAE against scratch")
    for target in targets:
        frame, markdown = target_table(runs_of[target["split"]], target["sources"], target_title(target))
        write_table(frame, markdown, out / "targets" / f"{target['split']}.csv",
                    out / "targets" / f"{target['split']}.md", f"Transfer to {target_title(target)}, every mode")
    return cells.to_dict(orient="records")


def _tables(spec: dict[str, Any], results: pd.DataFrame, out: Path) -> dict[str, Any]:
    """Table 2, and Table 3 where the spec asks for it; their rows for the summary."""
    depths = list(spec["depths"])
    rows = [(s["name"], s["label"], study.TABLE2.get(s.get("role") or "")) for s in spec["sources"]]
    frame, markdown = transfer_table(results, "scratch", rows, depths, study.BASELINE_MAE)
    write_table(
        frame,
        markdown,
        out / "table2.csv",
        out / "table2.md",
        "Table 2: band-gap test MAE after transfer (embedding + first k conv layers frozen)",
    )
    summary: dict[str, Any] = {"table2": frame.to_dict(orient="records")}
    if spec.get("table3"):
        t3 = spec["table3"]
        sizes = {k: f"{v:,}" if isinstance(v, int) else str(v) for k, v in t3["sizes"].items()}
        rows3 = [
            (t3["combined"], f"Combined ({sizes[t3['combined']]} crystals)", study.TABLE3["combined"]),
            (
                t3["formation_energy"],
                f"Formation energy ({sizes[t3['formation_energy']]} crystals)",
                study.TABLE3["formation_energy"],
            ),
        ]
        frame3, markdown3 = transfer_table(results, "scratch", rows3, depths, study.BASELINE_MAE)
        markdown3 += (
            f"\nBoth sources pretrained on the same number of crystals (the study: {study.TABLE3_PRETRAIN_SIZE:,}).\n"
        )
        write_table(
            frame3,
            markdown3,
            out / "table3.csv",
            out / "table3.md",
            "Table 3: combined vs formation-energy pretraining at equal pretraining size",
        )
        summary["table3"] = frame3.to_dict(orient="records")
    return summary


def _figures(spec: dict[str, Any], results: pd.DataFrame, out: Path, summary: dict[str, Any]) -> None:
    """Figure 5, Figure 6 and the learning curves where asked for, and the parity plot of the best cell."""
    depth = spec["figure_depth"]
    curves: dict[str, list[str]] = {}
    for source in [{"name": "scratch", "label": "baseline (scratch)"}] + spec["sources"]:
        chosen = results[
            (results["source"] == source["name"]) & (results["depth"] == (0 if source["name"] == "scratch" else depth))
        ]
        if len(chosen):
            curves[source["label"]] = [str(Path(p).with_name("metrics.csv")) for p in chosen["path"]]
    loss_curves_figure(
        curves,
        out / "fig5_loss_curves.png",
        f"{spec.get('target_label', 'band gap').capitalize()} training after transfer ({depth} conv layers "
        "frozen) against the baseline from scratch (grey), mean ± std over seeds",
        baseline="baseline (scratch)",
    )
    if spec.get("figure6"):
        f6 = spec["figure6"]
        params = {k: json.loads((Path(f6[k]) / "test.json").read_text())["parameters"] for k in ("gated", "attention")}
        attention_figure(
            Path(f6["gated"]) / "metrics.csv",
            Path(f6["attention"]) / "metrics.csv",
            out / "fig6_attention.png",
            params["gated"],
            params["attention"],
        )
        summary["figure6_parameters"] = params
    if spec.get("curves"):
        runs, about = curve_points(spec["curves"])
        unit = spec["target_unit"]
        learning_curves_figure(runs, out / "learning_curves.png", unit, spec.get("target_label", "band gap"),
                               about["n_test"])
        frame, markdown, best = curves_table(runs, about, unit)
        write_table(frame, markdown, out / "learning_curves.csv", out / "learning_curves.md",
                    f"Learning curves: {spec.get('target_label', 'band gap')} test MAE by training size")
        summary["learning_curves"] = {
            "table": frame.to_dict(orient="records"),
            "best_per_size": best,
            "test_set": about,
            "runs": runs[["key", "mode", "train_size", "seed", "test_mae", "own_test_mae"]].to_dict(orient="records"),
        }
    cells = results.groupby(["source", "depth"])["test_mae"].mean()
    best_source, best_depth = cells.idxmin()
    best = results[(results["source"] == best_source) & (results["depth"] == best_depth)].sort_values("seed").iloc[0]
    labels = {s["name"]: s["label"] for s in spec["sources"]}
    what = (
        "from scratch"
        if best_source == "scratch"
        else f"{labels.get(best_source, best_source)}, "
        + ("first conv layer frozen" if best_depth == 1 else f"first {best_depth} conv layers frozen")
    )
    parity_figure(
        Path(best["path"]).with_name("predictions.csv"),
        out / "parity_best.png",
        f"Lowest mean test MAE: {what}; seed {best['seed']}",
        spec["target_unit"],
        spec.get("target_label", "value"),
    )
    summary["best"] = {"source": best_source, "depth": int(best_depth), "mean_test_mae": float(cells.min())}


def run(spec: dict[str, Any], out: str | Path, log=print) -> dict[str, Any]:
    """The ``report`` stage: every table and figure of the report, from the jobs' result files."""
    summary = build_report(spec, out)
    best = summary["best"]
    log(
        f"report written to {out}; best transfer cell: {best['source']} at depth {best['depth']}, "
        f"mean test MAE {best['mean_test_mae']:.3f}"
    )
    return summary
