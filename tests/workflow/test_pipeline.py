"""The whole chain on configs/tiny.yaml through Snakemake: data, graphs, pretraining, transfer to two targets,
curves, report.

Checks the tables' shape and that every number in them comes from a job's test.json (the transfer matrix's
cells too), that the figures exist, that a rerun has nothing to do, and that the HTML report builds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, subprocess_env


def snakemake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=REPO, capture_output=True, text=True, env=subprocess_env()
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("tiny") / "results"
    result = snakemake("all", "--cores", "2", "--configfile", "configs/tiny.yaml", "--config", f"results_dir={results}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return results


def test_tables_have_the_study_layout_and_come_from_job_files(tiny_run: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    transfer = config["transfer"]
    study = transfer["targets"][0]["split"]
    table2 = pd.read_csv(tiny_run / "report" / "table2.csv")
    assert list(table2["source"])[0] == "baseline (from scratch)"
    assert len(table2) == 1 + len(transfer["sources"])
    for depth in transfer["depths"]:
        assert {f"mae_{depth}", f"std_{depth}", f"study_{depth}", f"p_{depth}"} <= set(table2.columns)
    base = tiny_run / "transfer" / study
    for row, source in zip(table2.itertuples(), ["scratch"] + transfer["sources"], strict=True):
        for depth in transfer["depths"]:
            folder_depth = 0 if source == "scratch" else depth
            values = [
                json.loads((base / source / f"depth{folder_depth}" / f"seed{seed}" / "test.json").read_text())[
                    "test_mae"
                ]
                for seed in transfer["seeds"]
            ]
            assert getattr(row, f"mae_{depth}") == pytest.approx(np.mean(values), rel=1e-9)
            assert getattr(row, f"std_{depth}") == pytest.approx(np.std(values, ddof=1), rel=1e-9)
            # each job's MAE is the mean absolute error of its own predictions file
            for seed in transfer["seeds"]:
                job = base / source / f"depth{folder_depth}" / f"seed{seed}"
                predictions = pd.read_csv(job / "predictions.csv")
                recorded = json.loads((job / "test.json").read_text())["test_mae"]
                assert (predictions["target"] - predictions["prediction"]).abs().mean() == pytest.approx(
                    recorded, abs=1e-5
                )
    assert table2.loc[1, "study_1"] == pytest.approx(0.797)  # the study's published value sits beside ours
    markdown = (tiny_run / "report" / "table2.md").read_text()
    assert "| baseline (from scratch) |" in markdown and "0.812" in markdown
    table3 = pd.read_csv(tiny_run / "report" / "table3.csv")
    assert len(table3) == 3 and "Combined (200 crystals)" in set(table3["source"])


def test_every_matrix_cell_is_the_validation_choice_of_its_jobs(tiny_run: Path) -> None:
    """Each (target, source) cell of the transfer matrix is, recomputed here from the jobs' test.json files, the
    (mode, depth) with the lowest mean validation MAE, its mean test MAE, its change against scratch and the
    paired t-test; every planned (target, source) has its cell, and each target's table bolds that choice."""
    from scipy import stats

    from crystal_transfer.experiments.matrix import runs, targets

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cells = pd.read_csv(tiny_run / "report" / "transfer_matrix.csv")
    planned = targets(config)
    assert len(planned) == 2 and {m for t in planned for m in t.modes} == {"freeze", "finetune", "atomsets"}
    assert len(cells) == sum(len(target.sources) for target in planned)
    for target in planned:
        records = [json.loads(Path(run.test_json(str(tiny_run))).read_text()) for run in runs(config, target)]
        assert {r["target"] for r in records} == {target.label}
        scratch = {r["seed"]: r["test_mae"] for r in records if r["source"] == "scratch"}
        table = (tiny_run / "report" / "targets" / f"{target.split}.md").read_text()
        for source in target.sources:
            groups: dict[str, list[dict]] = {}
            for r in records:
                if r["source"] == source:
                    level = r["level"] if r["mode"] == "atomsets" else r["depth"]
                    groups.setdefault(f"{r['mode']}/{level}", []).append(r)
            assert len(groups) == (1 if config["pretrain"][source]["kind"] == "chgnet" else
                                   len(target.depths) * ("freeze" in target.modes)
                                   + ("finetune" in target.modes) + ("atomsets" in target.modes))
            chosen_key = min(groups, key=lambda k: np.mean([r["best_val_mae"] for r in groups[k]]))
            chosen = groups[chosen_key]
            cell = cells[(cells["target"] == target.split) & (cells["source"] == source)].iloc[0]
            assert f"{cell['mode']}/{cell['depth']}" == chosen_key
            test = {r["seed"]: r["test_mae"] for r in chosen}
            assert cell["test_mae"] == pytest.approx(np.mean(list(test.values())), rel=1e-9)
            assert cell["val_mae"] == pytest.approx(np.mean([r["best_val_mae"] for r in chosen]), rel=1e-9)
            assert cell["scratch_test_mae"] == pytest.approx(np.mean(list(scratch.values())), rel=1e-9)
            assert cell["relative_change"] == pytest.approx(cell["test_mae"] / cell["scratch_test_mae"] - 1, rel=1e-9)
            seeds = sorted(test)
            p = stats.ttest_rel([test[s] for s in seeds], [scratch[s] for s in seeds], alternative="less").pvalue
            assert cell["p_value"] == pytest.approx(p, rel=1e-6)
            assert bool(cell["better_than_scratch"]) == (p < 0.05)
            assert f"**{cell['test_mae']:.3f}" in table  # the target's table bolds the same choice
    assert (tiny_run / "report" / "transfer_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_and_summary_exist(tiny_run: Path) -> None:
    for name in ("fig5_loss_curves.png", "fig6_attention.png", "learning_curves.png", "parity_best.png"):
        path = tiny_run / "report" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((tiny_run / "report" / "summary.json").read_text())
    assert summary["figure6_parameters"]["attention"] < summary["figure6_parameters"]["gated"]
    modes = {row["mode"] for row in summary["learning_curves"]["runs"]}
    assert modes == {"atomsets", "finetune", "scratch"}


def test_learning_curves_compare_every_source_on_one_test_set(tiny_run: Path) -> None:
    """The curves table has a row per planned curve (CGCNN, CHGNet and SevenNet features, fine-tuning, scratch),
    each cell the mean over seeds of MAEs recomputed from the runs' predictions on the test crystals that every
    run predicted, and names the best curve per size with its paired test."""
    from crystal_transfer.experiments.curves import curve_plan

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    plan = curve_plan(config)
    curves = config["learning_curves"]
    table = pd.read_csv(tiny_run / "report" / "learning_curves.csv")
    assert list(table["curve"]) == [curve.key for curve in plan]
    base = tiny_run / "curves" / config["transfer"]["targets"][0]["split"]
    predictions = {
        (curve.key, size, seed): pd.read_csv(base / curve.key / f"n{size}" / f"seed{seed}" / "predictions.csv")
        for curve in plan for size in curves["train_sizes"] for seed in curves["seeds"]
    }
    shared = sorted(set.intersection(*(set(frame["id"]) for frame in predictions.values())))
    summary = json.loads((tiny_run / "report" / "summary.json").read_text())["learning_curves"]
    assert summary["test_set"]["n_test"] == len(shared)
    for row, curve in zip(table.itertuples(), plan, strict=True):
        for size in curves["train_sizes"]:
            maes = []
            for seed in curves["seeds"]:
                frame = predictions[(curve.key, size, seed)].set_index("id").loc[shared]
                maes.append((frame["prediction"] - frame["target"]).abs().mean())
            assert getattr(row, f"mae_{size}") == pytest.approx(np.mean(maes), abs=1e-9)
    best = {entry["train_size"]: entry for entry in summary["best_per_size"]}
    for size in curves["train_sizes"]:
        assert table.loc[table[f"mae_{size}"].idxmin(), "curve"] == best[size]["best"]
    markdown = (tiny_run / "report" / "learning_curves.md").read_text()
    assert "Lowest test MAE at each training size" in markdown and "AtomSets on SevenNet-0 (11Jul2024)" in markdown


def test_rerun_has_nothing_to_do(tiny_run: Path) -> None:
    result = snakemake(
        "all", "-n", "--cores", "1", "--configfile", "configs/tiny.yaml", "--config", f"results_dir={tiny_run}"
    )
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def test_html_report_builds(tiny_run: Path) -> None:
    html = tiny_run.parent / "report.html"
    result = snakemake(
        "all", "--report", str(html), "--configfile", "configs/tiny.yaml", "--config", f"results_dir={tiny_run}"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert html.is_file() and html.stat().st_size > 10_000
