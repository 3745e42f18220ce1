"""Issue #19: a user's own small dataset (real OQMD crystals with experimental formation enthalpies, POSCAR files
and a CSV) through ``init``, the pipeline at tiny sizes, ``results/best/`` and ``predict`` on held-out files.

Checks that the chosen model is the candidate of lowest mean validation MAE, that the test set never entered the
choice (a second run whose test labels alone are changed chooses the same, from identical validation MAEs), and
that the ensemble's prediction is the mean (and its std the spread) of its members' own predictions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, shared, subprocess_env

N_STUDY = 170  # crystals in the user's folder (in archive order); init finds which the data stage rejects
N_NEW = 6  # held-out POSCAR files for predict


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _tiny(config: dict, results: Path, labels: Path) -> dict:
    """init's config at test sizes: 2 epochs, 2 seeds, one frozen depth, CHGNet as the universal source."""
    config = json.loads(json.dumps(config))
    config["results_dir"] = str(results)
    config["datasets"]["oqmd_user"]["sources"][0]["labels"] = str(labels)
    config["train"]["epochs"] = 2
    transfer = config["transfer"]
    transfer["seeds"], transfer["depths"] = [0, 1], [1]
    transfer["sources"] = [s for s in transfer["sources"] if s != "sevenn"]
    config["pretrain"].pop("sevenn", None)
    transfer["atomsets"].update(epochs=30, patience=10, hidden=32)
    return config


def _pipeline(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    _run("-m", "snakemake", "all", "--cores", "2", "--configfile", str(path))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("user")
    archive = shared("oqmd1505", "structures.tar.gz")
    if not archive.is_file():
        pytest.skip(f"shared oqmd1505 data not found at {archive} (set CRYSTAL_TRANSFER_SHARED_DATA)")
    labels = pd.read_csv(shared("oqmd1505", "experimental.csv"))
    (root / "structures").mkdir()
    (root / "new").mkdir()
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()][: N_STUDY + N_NEW]
        for index, member in enumerate(members):
            folder = root / ("structures" if index < N_STUDY else "new")
            (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    study_ids = [int(Path(m.name).stem) for m in members[:N_STUDY]]
    user = labels.set_index("id").loc[study_ids, ["experimental_delta_h"]]
    user = user.rename(columns={"experimental_delta_h": "dH"})
    user.index.name = "material"
    user.to_csv(root / "dH.csv")
    result = _run("-m", "crystal_transfer", "init", "--structures", str(root / "structures"), "--labels",
                  str(root / "dH.csv"), "--target", "dH", "--id-column", "material", "--unit", "eV/atom",
                  "--name", "oqmd_user", "--out", str(root / "study.yaml"))
    config = yaml.safe_load((root / "study.yaml").read_text())

    first = _tiny(config, root / "results_a", root / "dH.csv")
    _pipeline(first, root / "a.yaml")
    # the same study with every test crystal's label changed, and nothing else
    split = pd.read_csv(root / "results_a" / "data" / "oqmd_user" / "splits" / "dH.csv")
    test_ids = split.loc[split["split"] == "test", "id"].astype(int)
    perturbed = user.copy()
    perturbed.loc[test_ids, "dH"] += np.random.default_rng(0).normal(0.0, 1.0, len(test_ids))
    perturbed.to_csv(root / "dH_test_perturbed.csv")
    second = _tiny(config, root / "results_b", root / "dH_test_perturbed.csv")
    _pipeline(second, root / "b.yaml")
    return {"root": root, "init": result.stdout, "config": config, "first": first, "test_ids": list(test_ids)}


def _candidates(results: Path) -> pd.DataFrame:
    rows = []
    for path in sorted((results / "transfer" / "dH").glob("*/*/seed*/test.json")):
        record = json.loads(path.read_text())
        rows.append({"source": path.parts[-4], "segment": path.parts[-3], "val": record["best_val_mae"],
                     "test": record["test_mae"]})
    return pd.DataFrame(rows).groupby(["source", "segment"]).mean()


def test_init_describes_the_data_and_sizes_the_study(study: dict) -> None:
    config = study["config"]
    kept = len(pd.read_parquet(study["root"] / "results_a" / "data" / "oqmd_user" / "crystals.parquet"))
    assert f"{N_STUDY} files ({N_STUDY} poscar)" in study["init"]
    assert f"{N_STUDY} crystals read, {kept} kept" in study["init"] and "element_above_max_z" in study["init"]
    assert "dH: mean" in study["init"] and "snakemake --cores all all --configfile" in study["init"]
    assert config["splits"]["dH"] == {"dataset": "oqmd_user", "label": "dH", "train": 0.6, "val": 0.2, "test": 0.2,
                                      "seed": 0}
    assert config["transfer"]["targets"] == [{"split": "dH", "transform": "identity",
                                              "modes": ["freeze", "finetune", "atomsets"]}]
    assert len(config["transfer"]["seeds"]) == 5  # under 1,000 training crystals: 5 seeds for the paired test


def test_the_chosen_model_has_the_lowest_validation_mae_and_ignores_the_test_set(study: dict) -> None:
    root = study["root"]
    card = json.loads((root / "results_a" / "best" / "dH" / "model_card.json").read_text())
    candidates = _candidates(root / "results_a")
    best = candidates["val"].idxmin()
    segment = {"freeze": f"depth{card['chosen']['depth']}", "finetune": "finetune", "scratch": "depth0",
               "atomsets": f"atomsets-level{card['chosen']['depth']}"}[card["chosen"]["mode"]]
    assert (card["chosen"]["source"], segment) == best
    assert card["chosen"]["val_mae"] == pytest.approx(candidates.loc[best, "val"], rel=1e-12)
    assert len(card["candidates"]) == len(candidates) and [c["seeds"] for c in card["candidates"]] == [[0, 1]] * len(
        candidates)
    # the test labels alone changed: identical validation MAEs, other test MAEs, the same choice
    perturbed = _candidates(root / "results_b")
    pd.testing.assert_series_equal(perturbed["val"], candidates["val"])
    assert not np.allclose(perturbed["test"], candidates["test"])
    again = json.loads((root / "results_b" / "best" / "dH" / "model_card.json").read_text())
    assert again["chosen"] == card["chosen"] and again["test"]["ensemble_mae"] != card["test"]["ensemble_mae"]
    for name in ("parity.png", "calibration.png", "test_predictions.csv"):
        assert (root / "results_a" / "best" / "dH" / name).stat().st_size > 0


def test_the_ensemble_predicts_the_mean_and_spread_of_its_members(study: dict) -> None:
    root = study["root"]
    best = root / "results_a" / "best" / "dH"
    card = json.loads((best / "model_card.json").read_text())
    _run("-m", "crystal_transfer", "predict", "--model", str(best), "--input", str(root / "new"), "--out",
         str(root / "ensemble.csv"))
    ensemble = pd.read_csv(root / "ensemble.csv", keep_default_na=False).set_index("id")
    assert list(ensemble.columns) == ["prediction", "std", "error"] and len(ensemble) == N_NEW
    members = []
    for member in card["members"]:
        out = root / f"member{member['seed']}.csv"
        _run("-m", "crystal_transfer", "predict", "--model", str(best / member["path"]), "--input", str(root / "new"),
             "--out", str(out))
        members.append(pd.read_csv(out, keep_default_na=False).set_index("id"))
    usable = ensemble[ensemble["error"] == ""].index
    assert len(usable) >= N_NEW - 2  # held-out crystals above Z 80 keep their row with the reason
    values = np.array([m.loc[usable].iloc[:, 0].astype(float) for m in members])
    np.testing.assert_allclose(ensemble.loc[usable, "prediction"].astype(float), values.mean(0), rtol=2e-5,
                               atol=1e-5)
    np.testing.assert_allclose(ensemble.loc[usable, "std"].astype(float), values.std(0), rtol=1e-3, atol=2e-5)
    for crystal_id in ensemble.index.difference(usable):
        assert all(m.loc[crystal_id, "error"] == ensemble.loc[crystal_id, "error"] for m in members)
