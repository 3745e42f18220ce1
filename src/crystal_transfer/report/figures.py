"""The report's figures: loss curves (Figure 5), attention against gated (Figure 6), learning curves, parity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from crystal_transfer.atomic import atomic_path


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


def loss_curves_figure(curves: dict[str, Sequence[str | Path]], path: str | Path, title: str,
                       baseline: str | None = None) -> None:
    """Small multiples: one panel per labelled group of runs with its training (dashed) and validation (solid)
    loss per epoch, mean ± std over seeds, and the ``baseline`` group's curves in grey in every panel."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = [label for label in curves if label != baseline]
    columns = min(3, max(1, len(panels)))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.7 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(ax, files, colour, label):
        for column, style, suffix in (("train_loss", "--", "train"), ("val_loss", "-", "validation")):
            epochs, mean, std = mean_curve(files, column)
            ax.plot(epochs, mean, style, color=colour, label=f"{label}, {suffix}", linewidth=1.4)
            ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)

    for index, label in enumerate(panels):
        ax = axes[index // columns][index % columns]
        if baseline in curves:
            draw(ax, curves[baseline], "0.6", "scratch")
        draw(ax, curves[label], colours[index % len(colours)], "transferred")
        ax.set_title(label, fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if index == 0:
            ax.legend(fontsize=6.5, loc="upper right")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    for column in range(columns):  # the lowest panel of each column carries the epoch axis
        ax = axes[(len(panels) - 1 - column) // columns][column]
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("epoch")
    for row in axes:
        row[0].set_ylabel("MSE loss (standardised)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
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


def learning_curves_figure(runs: pd.DataFrame, path: str | Path, unit: str = "eV", target: str = "band gap",
                           n_test: int | None = None) -> None:
    """Test MAE against training size (log axis, ticks at the sizes) for each curve of
    :func:`crystal_transfer.report.curves.curve_points`, mean ± std over seeds, in plan order."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    seeds = runs.groupby(["key", "train_size"])["seed"].nunique()
    styles = {"atomsets": "-", "finetune": "--", "scratch": ":"}
    for key in dict.fromkeys(runs["key"]):
        group = runs[runs["key"] == key]
        summary = group.groupby("train_size")["test_mae"].agg(["mean", "std"]).reset_index()
        ax.errorbar(summary["train_size"], summary["mean"], yerr=summary["std"].fillna(0), marker="o", capsize=3,
                    linestyle=styles.get(group["curve_mode"].iloc[0], "-"), label=group["label"].iloc[0])
    sizes = sorted(int(n) for n in runs["train_size"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{n:,}" for n in sizes])
    ax.set_xlabel("training crystals")
    ax.set_ylabel(f"{target} test MAE ({unit})")
    counts = sorted({int(c) for c in seeds})
    spread = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    where = f"{n_test:,} {target} test crystals" if n_test else f"one {target} test set"
    ax.set_title(f"Learning curves on {where} (mean ± std over {spread} seed{'s' if counts[-1] > 1 else ''})",
                 fontsize=10)
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


def ensemble_figures(frame: pd.DataFrame, bins: pd.DataFrame, parity: str | Path, calibration: str | Path,
                     title: str, unit: str, label: str) -> None:
    """A seed ensemble on the test set: the parity plot of its mean with the std as error bars, and its
    calibration (``bins``: per equal-count bin of std, the mean std, mean |error| and RMS error)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.errorbar(frame["target"], frame["prediction"], yerr=frame["std"], fmt="o", ms=3, alpha=0.5, elinewidth=0.6)
    low = float(min(frame["target"].min(), frame["prediction"].min()))
    high = float(max(frame["target"].max(), frame["prediction"].max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1)
    mae = float((frame["target"] - frame["prediction"]).abs().mean())
    ax.set_xlabel(f"{label} ({unit})" if unit else label)
    ax.set_ylabel(f"ensemble mean ± std ({unit})" if unit else "ensemble mean ± std")
    ax.set_title(f"{title}\nensemble test MAE {mae:.3f} {unit}, {len(frame)} test crystals", fontsize=9)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    _save(fig, parity)

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot(bins["std"], bins["mae"], "o-", label="mean |error|")
    ax.plot(bins["std"], bins["rmse"], "s--", label="RMS error")
    top = float(max(bins["std"].max(), bins["rmse"].max())) * 1.05
    ax.plot([0, top], [0, top], color="grey", linewidth=1, label="error = std")
    ax.plot([0, top], [0, top * np.sqrt(2 / np.pi)], color="grey", linewidth=1, linestyle=":",
            label="|error| of a Gaussian with this std")
    ax.set_xlabel(f"ensemble std over seeds ({unit})" if unit else "ensemble std over seeds")
    ax.set_ylabel(f"test error ({unit})" if unit else "test error")
    ax.set_title(f"{title}\ncalibration: {len(frame)} test crystals in {len(bins)} equal-count bins of std",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, calibration)


# -- the report stage ----------------------------------------------------------------------------------------
