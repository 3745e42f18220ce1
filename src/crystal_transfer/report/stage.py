"""Tables 2 and 3 of the study and the figures, from the metrics files the training jobs write.

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

from crystal_transfer.atomic import atomic_path, write_text

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


def paired_p_value(candidate: dict[int, float], baseline: dict[int, float]) -> float | None:
    """One-sided paired t-test (candidate MAE < baseline MAE) over the seeds both have; None below 2 pairs."""
    seeds = sorted(set(candidate) & set(baseline))
    if len(seeds) < 2:
        return None
    a = np.array([candidate[s] for s in seeds])
    b = np.array([baseline[s] for s in seeds])
    if np.allclose(a - b, (a - b)[0]):  # constant differences: t is undefined
        return 0.0 if (a - b)[0] < 0 else 1.0
    return float(stats.ttest_rel(a, b, alternative="less").pvalue)


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    _pyplot().close(fig)


def mean_curve(metric_files: Sequence[str | Path], column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, std) of a metrics.csv column over runs (seeds)."""
    frames = [pd.read_csv(path) for path in metric_files]
    length = min(len(frame) for frame in frames)
    values = np.stack([frame[column].to_numpy()[:length] for frame in frames])
    epochs = frames[0]["epoch"].to_numpy()[:length]
    std = values.std(axis=0, ddof=1) if len(frames) > 1 else np.zeros(length)
    return epochs, values.mean(axis=0), std


def loss_curves_figure(curves: dict[str, Sequence[str | Path]], path: str | Path, title: str) -> None:
    """Training (dashed) and validation (solid) loss per epoch for each labelled group of runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, files) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        for column, style, suffix in (("train_loss", "--", "train"), ("val_loss", "-", "validation")):
            epochs, mean, std = mean_curve(files, column)
            ax.plot(epochs, mean, style, color=colour, label=f"{label} ({suffix})")
            ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE loss (standardised band gap)")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def attention_figure(
    gated: str | Path, attention: str | Path, path: str | Path, gated_params: int | None, attention_params: int | None
) -> None:
    """Validation loss of the attention model against the gated CGCNN, both trained the same way."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, file, params in (("CGCNN (gated)", gated, gated_params), ("attention", attention, attention_params)):
        frame = pd.read_csv(file)
        suffix = f", {params:,} parameters" if params else ""
        ax.plot(frame["epoch"], frame["val_loss"], marker="o", markersize=3, label=f"{label}{suffix}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MSE loss (standardised formation energy)")
    ax.set_title("Attention vs gated convolution, trained on formation energy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def learning_curves_figure(
    results: pd.DataFrame,
    path: str | Path,
    unit: str = "eV",
    labels: dict[str, str] | None = None,
    target: str = "band gap",
) -> None:
    """Test MAE against training size (log axis, ticks at the sizes) for each mode, mean ± std over seeds."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator

    labels = labels or {}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    seeds = results.groupby(["mode", "train_size"])["seed"].nunique()
    for mode, group in results.groupby("mode", sort=True):
        summary = group.groupby("train_size")["test_mae"].agg(["mean", "std", "count"]).reset_index()
        ax.errorbar(
            summary["train_size"],
            summary["mean"],
            yerr=summary["std"].fillna(0),
            marker="o",
            capsize=3,
            label=labels.get(mode, mode),
        )
    sizes = sorted(int(n) for n in results["train_size"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{n:,}" for n in sizes])
    ax.set_xlabel("training crystals")
    ax.set_ylabel(f"{target} test MAE ({unit})")
    counts = sorted({int(c) for c in seeds})
    spread = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    ax.set_title(f"Learning curves on one {target} test set (mean ± std over {spread} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    # the labels are long: below the axes, where they cover no point
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    _save(fig, path)


def parity_figure(
    predictions_csv: str | Path, path: str | Path, title: str, unit: str = "eV", target: str = "value"
) -> None:
    """Predicted against true value on the test set, with the identity line and the MAE."""
    plt = _pyplot()
    frame = pd.read_csv(predictions_csv)
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.scatter(frame["target"], frame["prediction"], s=8, alpha=0.5)
    low = float(min(frame["target"].min(), frame["prediction"].min()))
    high = float(max(frame["target"].max(), frame["prediction"].max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1)
    mae = float((frame["target"] - frame["prediction"]).abs().mean())
    ax.set_xlabel(f"DFT {target} ({unit})")
    ax.set_ylabel(f"predicted {target} ({unit})")
    ax.set_title(f"{title}\nMAE {mae:.3f} {unit}, {len(frame)} test crystals", fontsize=9)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    _save(fig, path)


# -- the report stage ----------------------------------------------------------------------------------------


def build_report(spec: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write Tables 2 and 3, Figures 5 and 6 and the parity plot from the jobs' files named in ``spec``.

    ``spec``: ``results`` (every transfer and baseline test.json), ``sources`` ([{name, label, role}]),
    ``depths``, ``figure_depth``, ``table3`` ({combined, formation_energy, sizes} or null), ``figure6``
    ({gated, attention: pretrain folders} or null), ``target_unit``.
    """
    from crystal_transfer.report import study

    out = Path(out_dir)
    results = read_results(spec["results"])
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
        f"Band-gap training after transfer ({depth} conv layers frozen), mean ± std over seeds",
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
        curves_frame = read_results(spec["curves"])
        learning_curves_figure(
            curves_frame,
            out / "learning_curves.png",
            spec["target_unit"],
            spec.get("curve_labels"),
            spec.get("target_label", "band gap"),
        )
        summary["learning_curves"] = (
            curves_frame.groupby(["mode", "train_size"])["test_mae"].agg(["mean", "std", "count"]).reset_index()
            .to_dict(orient="records")
        )
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
    from crystal_transfer.atomic import write_json

    write_json(out / "summary.json", summary)
    return summary


def run(spec: dict[str, Any], out: str | Path, log=print) -> dict[str, Any]:
    """The ``report`` stage: every table and figure of the report, from the jobs' result files."""
    summary = build_report(spec, out)
    best = summary["best"]
    log(
        f"report written to {out}; best transfer cell: {best['source']} at depth {best['depth']}, "
        f"mean test MAE {best['mean_test_mae']:.3f}"
    )
    return summary
