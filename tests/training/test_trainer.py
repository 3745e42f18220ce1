"""The trainer and transfer runs on real crystals: resume after SIGKILL, frozen-feature caching, freezing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, shared, subprocess_env

from crystal_transfer.errors import InputError

TRAIN = {"epochs": 4, "batch_size": 32, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "device": "cpu"}
ARCH = {"atom_fea_len": 32, "n_conv": 3, "h_fea_len": 16, "n_h": 1}


def transfer_command(paths: dict[str, Path], out: Path, *extra: str, epochs: int = 4) -> list[str]:
    spec = json.dumps({"train": {**TRAIN, "epochs": epochs}, "architecture": ARCH})
    return [
        sys.executable,
        "-m",
        "crystal_transfer",
        "transfer",
        "--target",
        "band_gap",
        "--graphs",
        str(paths["graphs"]),
        "--table",
        str(paths["table"]),
        "--split",
        str(paths["split"]),
        "--spec",
        spec,
        "--out",
        str(out),
        *extra,
    ]


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=subprocess_env())
    assert result.returncode == 0, result.stdout + result.stderr


def test_killed_run_resumes_to_the_same_final_metrics(matminer_graphs: dict[str, Path], tmp_path: Path) -> None:
    scratch = ["--name", "scratch", "--mode", "scratch", "--seed", "3"]
    epochs = 6
    run(transfer_command(matminer_graphs, tmp_path / "whole", *scratch, epochs=epochs))
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        transfer_command(matminer_graphs, killed_dir, *scratch, epochs=epochs),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    metrics = killed_dir / "metrics.csv"
    while time.time() < deadline:  # wait until two epochs are done, then kill it during the third
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before_kill = len(pd.read_csv(metrics))
    assert 2 <= done_before_kill < epochs, "the kill must land mid-run"
    assert not (killed_dir / "test.json").exists()
    run(transfer_command(matminer_graphs, killed_dir, *scratch, epochs=epochs))
    whole = pd.read_csv(tmp_path / "whole" / "metrics.csv").drop(columns=["seconds"])
    resumed = pd.read_csv(metrics).drop(columns=["seconds"])
    pd.testing.assert_frame_equal(whole, resumed)
    first = json.loads((tmp_path / "whole" / "test.json").read_text())
    second = json.loads((killed_dir / "test.json").read_text())
    # same to float rounding (CPU kernels may sum in another order across processes)
    assert second["test_mae"] == pytest.approx(first["test_mae"], rel=1e-6)
    assert first["best_epoch"] == second["best_epoch"]


def test_identical_runs_write_identical_files_and_a_damaged_checkpoint_is_set_aside(
    matminer_graphs: dict[str, Path], tmp_path: Path
) -> None:
    """Issue #16, classes 5 and 7: two identical runs write byte-identical weights and best.pt (no temporary name
    inside the archive); a truncated last.pt is moved aside with a message and its job starts afresh to the same
    result, instead of failing on every rerun."""
    scratch = ["--name", "scratch", "--mode", "scratch", "--seed", "5"]
    first, second = tmp_path / "first", tmp_path / "second"
    run(transfer_command(matminer_graphs, first, *scratch, epochs=2))
    run(transfer_command(matminer_graphs, second, *scratch, epochs=2))
    for name in ("model/weights.pt", "best.pt"):  # (last.pt holds each epoch's wall time)
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    checkpoint = second / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    result = subprocess.run(transfer_command(matminer_graphs, second, *scratch, epochs=2), capture_output=True,
                            text=True, cwd=REPO, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert "is truncated or damaged" in result.stdout + result.stderr and "starting this run afresh" in result.stdout
    assert (second / "last.pt.damaged-1").is_file()
    assert (first / "model/weights.pt").read_bytes() == (second / "model/weights.pt").read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(first / "metrics.csv").drop(columns=["seconds"]),
                                  pd.read_csv(second / "metrics.csv").drop(columns=["seconds"]))
    # killed after its last epoch's checkpoint, before its outputs: Snakemake removes a job's outputs before it runs
    # the job again, and the rerun (every epoch done, nothing to train) writes every one of them again
    metrics, result = pd.read_csv(first / "metrics.csv"), json.loads((first / "test.json").read_text())
    for name in ("metrics.csv", "test.json", "predictions.csv"):
        (first / name).unlink()
    run(transfer_command(matminer_graphs, first, *scratch, epochs=2))
    pd.testing.assert_frame_equal(pd.read_csv(first / "metrics.csv"), metrics)
    assert json.loads((first / "test.json").read_text())["test_mae"] == pytest.approx(result["test_mae"], rel=1e-6)
    assert (first / "predictions.csv").is_file()


def test_a_target_that_cannot_be_standardised_is_named() -> None:
    """Issue #16, class 5: the normaliser's refusal names the target (real band gaps of four metals: all 0 eV)."""
    from crystal_transfer.errors import InputError
    from crystal_transfer.experiments.fit import fit_normalizers

    labels = pd.read_csv(shared("mp2018", "labels.csv")).set_index("material_id")
    metals = labels.loc[["mp-1", "mp-2", "mp-8", "mp-11"], ["formation_energy_per_atom", "band_gap"]].to_numpy()
    assert (metals[:, 1] == 0).all()
    with pytest.raises(InputError, match=r"target 'band_gap': cannot standardise its labels over the 4 labelled"):
        fit_normalizers(metals, ["formation_energy_per_atom", "band_gap"], {"band_gap": "eV"})


def test_model_gaussians_follow_the_graphs_radius(matminer_graphs: dict[str, Path], tmp_path: Path) -> None:
    """Issue #16, class 4: a model trained on graphs of radius 6 Å gets Gaussians that end at 6 Å (no config key
    sets the model's radius), so training on such graphs succeeds and the card records radius 6."""
    from crystal_transfer.graphs.settings import GraphSettings
    from crystal_transfer.graphs.stage import build_graphs

    graphs = tmp_path / "graphs6"
    build_graphs(matminer_graphs["table"], graphs, GraphSettings(radius=6.0), 2048, dataset="matminer", workers=2,
                 log=lambda _: None)
    spec = {"kind": "train", "dataset": "matminer", "targets": ["formation_energy_per_atom"], "subsample": 200,
            "train": {**TRAIN, "epochs": 1}, "architecture": ARCH}
    run([sys.executable, "-m", "crystal_transfer", "pretrain", "--name", "fe6", "--spec", json.dumps(spec),
         "--table", str(matminer_graphs["table"]), "--graphs", str(graphs), "--out", str(tmp_path / "pretrained")])
    paths = {**matminer_graphs, "graphs": graphs}
    run(transfer_command(paths, tmp_path / "scratch", "--name", "scratch", "--mode", "scratch", epochs=1))
    for run_dir in ("pretrained", "scratch"):
        card = json.loads((tmp_path / run_dir / "model" / "model.json").read_text())
        assert card["graph_settings"]["radius"] == 6.0 and card["architecture"]["init_args"]["radius"] == 6.0


@pytest.fixture(scope="module")
def source_model(matminer_graphs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small formation-energy model trained here (the trunk to transfer from)."""
    out = tmp_path_factory.mktemp("source")
    spec = {
        "kind": "train",
        "dataset": "matminer",
        "targets": ["formation_energy_per_atom"],
        "subsample": 300,
        "val": 0.2,
        "test": 0.2,
        "seed": 0,
        "conv_type": "gated",
        "train": {**TRAIN, "epochs": 2},
        "architecture": ARCH,
    }
    run(
        [
            sys.executable,
            "-m",
            "crystal_transfer",
            "pretrain",
            "--name",
            "fe",
            "--spec",
            json.dumps(spec),
            "--table",
            str(matminer_graphs["table"]),
            "--graphs",
            str(matminer_graphs["graphs"]),
            "--out",
            str(out),
        ]
    )
    return out / "model"


@pytest.mark.parametrize("depth", [1, 3])
def test_cached_frozen_features_give_the_same_metrics(matminer_graphs, source_model, tmp_path, depth) -> None:
    cache = tmp_path / f"cache{depth}.pt"
    run(
        [
            sys.executable,
            "-m",
            "crystal_transfer",
            "frozen-features",
            "--source",
            str(source_model),
            "--depth",
            str(depth),
            "--graphs",
            str(matminer_graphs["graphs"]),
            "--table",
            str(matminer_graphs["table"]),
            "--split",
            str(matminer_graphs["split"]),
            "--out",
            str(cache),
        ]
    )
    freeze = ["--name", "fe", "--source", str(source_model), "--mode", "freeze", "--depth", str(depth), "--seed", "1"]
    run(transfer_command(matminer_graphs, tmp_path / "plain", *freeze))
    run(transfer_command(matminer_graphs, tmp_path / "cached", *freeze, "--cache", str(cache)))
    plain = pd.read_csv(tmp_path / "plain" / "metrics.csv").drop(columns=["seconds"])
    cached = pd.read_csv(tmp_path / "cached" / "metrics.csv").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(plain, cached, rtol=1e-4, atol=1e-6)
    plain_test = json.loads((tmp_path / "plain" / "test.json").read_text())
    cached_test = json.loads((tmp_path / "cached" / "test.json").read_text())
    assert cached_test["test_mae"] == pytest.approx(plain_test["test_mae"], rel=1e-4)
    assert cached_test["cached"] and not plain_test["cached"]


def test_freezing_keeps_the_frozen_layers_and_their_batchnorm(matminer_graphs, source_model, tmp_path) -> None:
    from crystal_transfer.models.saved import load_model

    freeze = ["--name", "fe", "--source", str(source_model), "--mode", "freeze", "--depth", "2", "--seed", "0"]
    run(transfer_command(matminer_graphs, tmp_path / "run", *freeze, epochs=2))
    before = load_model(source_model).model.state_dict()
    after = load_model(tmp_path / "run" / "model").model.state_dict()
    for key, value in before.items():
        frozen = key.startswith("embedding.") or key.startswith(("convs.0.", "convs.1."))
        if frozen:  # weights and BatchNorm running statistics unchanged
            assert torch.equal(value, after[key]), key
    assert not torch.equal(before["convs.2.fc_full.weight"], after["convs.2.fc_full.weight"])
    result = json.loads((tmp_path / "run" / "test.json").read_text())
    assert result["trainable_parameters"] < result["parameters"]
    assert result["depth"] == 2 and result["source"] == "fe"


def test_transfer_refuses_graphs_of_another_radius(matminer_graphs, source_model, tmp_path) -> None:
    card = json.loads((source_model / "model.json").read_text())
    card["graph_settings"]["radius"] = 6.0
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.json").write_text(json.dumps(card))
    (other / "weights.pt").write_bytes((source_model / "weights.pt").read_bytes())
    command = transfer_command(
        matminer_graphs, tmp_path / "run", "--name", "x", "--source", str(other), "--mode", "freeze", "--depth", "1"
    )
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=subprocess_env())
    assert result.returncode == 2
    assert "was trained with radius=6.0 but the graphs" in result.stderr and "Traceback" not in result.stderr


def test_predict_on_cif_folder_tarball_and_table(matminer_graphs, source_model, tmp_path, mp2018_texts) -> None:
    import tarfile

    from pymatgen.core import Structure

    folder = tmp_path / "cifs"
    folder.mkdir()
    ids = list(mp2018_texts)[:20]
    for crystal_id in ids:
        (folder / f"{crystal_id}.cif").write_text(mp2018_texts[crystal_id])
    (folder / "broken.cif").write_text("not a crystal")
    # issue #16: a dummy species, atoms on top of each other and a cell far thinner than 8 Å, from a real crystal
    from pymatgen.core import Lattice
    from pymatgen.io.vasp import Poscar

    real = Structure.from_str(mp2018_texts[ids[3]], fmt="cif")
    lines = Poscar(real).get_str().splitlines()
    lines[5] = lines[5].replace(real[0].specie.symbol, "Xx", 1)
    (folder / "dummy.vasp").write_text("\n".join(lines) + "\n")
    on_top = real.copy()
    on_top.append(real[0].specie, real[0].frac_coords)
    (folder / "on_top.vasp").write_text(Poscar(on_top).get_str())
    thin = Structure(Lattice([[100, 0, 0], [0, 100, 0], [50.3, 50.7, 0.01]]), real.species[:1], real.frac_coords[:1])
    (folder / "thin.vasp").write_text(Poscar(thin).get_str())
    broken_ids = ["broken", "dummy", "on_top", "thin"]
    with tarfile.open(tmp_path / "cifs.tar.gz", "w:gz") as archive:
        archive.add(folder, arcname="structures")
    outputs = {}
    for name, source in (("folder", folder), ("tar", tmp_path / "cifs.tar.gz"), ("table", matminer_graphs["table"])):
        out = tmp_path / f"{name}.csv"
        run([sys.executable, "-m", "crystal_transfer", "predict", "--model", str(source_model), "--input", str(source),
             "--out", str(out)])
        outputs[name] = pd.read_csv(out, keep_default_na=False)
    folder_out = outputs["folder"].set_index("id")
    assert list(outputs["folder"].columns) == ["id", "formation_energy_per_atom (eV/atom)", "error"]
    files = sorted(p.name for p in folder.iterdir())
    assert list(outputs["folder"]["id"]) == [Path(name).stem for name in files]  # the input's order
    assert folder_out.loc["broken", "error"].startswith("unparsable: unparsable cif")
    assert folder_out.loc["dummy", "error"].startswith("unknown_element: site 0 holds 'Xx")
    assert folder_out.loc["on_top", "error"].startswith("overlapping_atoms: atoms 0 (")
    assert folder_out.loc["thin", "error"].startswith("unsearchable_cell: neighbour search failed: a cell far thinner")
    # the published model's data went through max_z=80: heavier crystals get the data stage's reason, not a value
    heavy = {i for i in ids if max(Structure.from_str(mp2018_texts[i], fmt="cif").atomic_numbers) > 80}
    assert heavy and all(folder_out.loc[i, "error"].startswith("element_above_max_z: contains") for i in heavy)
    good = folder_out.drop(index=[*broken_ids, *heavy])
    assert len(good) == 20 - len(heavy) and (good["error"] == "").all()
    assert np.isfinite(good.iloc[:, 0].astype(float)).all()
    tar_out = outputs["tar"].set_index("id").drop(index=[*broken_ids, *heavy])
    pd.testing.assert_frame_equal(good.sort_index(), tar_out.sort_index())
    table_out = outputs["table"].set_index("id")
    assert len(table_out) == 5158
    # a crystal of the table written out as CIF gets the prediction the table path gives it
    import pyarrow.parquet as pq
    from pymatgen.core import Lattice, Structure

    rows = pq.read_table(matminer_graphs["table"]).slice(0, 10).to_pylist()
    written = tmp_path / "from_table"
    written.mkdir()
    for row in rows:
        structure = Structure(Lattice(np.reshape(row["lattice"], (3, 3))), row["numbers"],
                              np.reshape(row["frac_coords"], (-1, 3)))
        structure.to(filename=str(written / f"{row['id']}.cif"))
    run([sys.executable, "-m", "crystal_transfer", "predict", "--model", str(source_model), "--input", str(written),
         "--out", str(tmp_path / "written.csv")])
    again = pd.read_csv(tmp_path / "written.csv").set_index("id")
    column = "formation_energy_per_atom (eV/atom)"
    for row in rows:
        assert again.loc[row["id"], column] == pytest.approx(float(table_out.loc[row["id"], column]), abs=2e-5)


@pytest.fixture(scope="module")
def feature_cache(matminer_graphs: dict[str, Path], source_model: Path, tmp_path_factory) -> Path:
    """The source's atom features after two convolutions, for every crystal of the split."""
    cache = tmp_path_factory.mktemp("features") / "depth2.pt"
    run([sys.executable, "-m", "crystal_transfer", "frozen-features", "--source", str(source_model), "--depth", "2",
         "--graphs", str(matminer_graphs["graphs"]), "--table", str(matminer_graphs["table"]),
         "--split", str(matminer_graphs["split"]), "--out", str(cache)])
    return cache


def atomsets_command(paths: dict[str, Path], cache: Path, out: Path, seed: int = 1) -> list[str]:
    spec = {"hidden": 16, "epochs": 40, "patience": 8, "batch_size": 32, "lr": 0.003}
    return [sys.executable, "-m", "crystal_transfer", "--threads", "1", "atomsets", "--name", "fe", "--cache",
            str(cache), "--table", str(paths["table"]), "--split", str(paths["split"]), "--target", "band_gap",
            "--train-size", "100", "--seed", str(seed), "--spec", json.dumps(spec), "--out", str(out)]


def test_atomsets_trains_through_the_trainer_and_saves_a_model(matminer_graphs, source_model, feature_cache,
                                                               tmp_path) -> None:
    from crystal_transfer.data.split import read_split
    from crystal_transfer.experiments.frozen_features import FeatureSetDataset, load_frozen_features
    from crystal_transfer.models.saved import load_model
    from crystal_transfer.models.set_model import SetModel

    run(atomsets_command(matminer_graphs, feature_cache, tmp_path / "a"))
    out = tmp_path / "a"
    assert {"metrics.csv", "test.json", "predictions.csv", "model", "last.pt", "best.pt"} <= {
        p.name for p in out.iterdir()
    } and not (out / "model.pt").exists()
    result = json.loads((out / "test.json").read_text())
    old_keys = {"mode", "seed", "target", "train_size", "test_mae", "best_epoch", "best_val_mae", "n_val", "n_test",
                "level", "pooling", "parameters", "seconds", "source"}
    assert old_keys <= set(result) and result["mode"] == "atomsets" and result["train_size"] == 100
    metrics = pd.read_csv(out / "metrics.csv")  # the Trainer's metrics, stopped early by patience
    assert list(metrics.columns[:4]) == ["epoch", "lr", "train_loss", "val_loss"] and "val_mae_band_gap" in metrics
    assert len(metrics) == result["epochs_trained"] <= 40
    assert result["best_val_mae"] == pytest.approx(metrics["val_mae_band_gap"].iloc[result["best_epoch"] - 1])
    card = json.loads((out / "model" / "model.json").read_text())
    source_card = json.loads((source_model / "model.json").read_text())
    assert card["architecture"]["class"] == "SetModel" and card["graph_settings"] is None
    assert card["inputs"] == {"kind": "frozen_features", "source": str(source_model),
                              "source_weights_sha256": source_card["weights_sha256"], "level": 2,
                              "feature_width": ARCH["atom_fea_len"]}
    assert card["data_fingerprint"]["num_ids"] == 100 and card["normalizers"]["band_gap"]["unit"] == "eV"
    # the reloaded model gives the predictions of the run
    saved = load_model(out / "model")
    assert isinstance(saved.model, SetModel)
    predictions = pd.read_csv(out / "predictions.csv")
    test_ids = read_split(matminer_graphs["split"])["test"]
    assert predictions["id"].tolist() == test_ids
    data = FeatureSetDataset(load_frozen_features(feature_cache), test_ids, predictions["target"].to_numpy())
    again = saved.predict(data.collate([data[i] for i in range(len(data))]))["band_gap"].numpy()
    np.testing.assert_allclose(again, predictions["prediction"], rtol=1e-5, atol=1e-5)
    assert (predictions["target"] - predictions["prediction"]).abs().mean() == pytest.approx(
        result["test_mae"], abs=1e-5
    )
    # same seed, same numbers
    run(atomsets_command(matminer_graphs, feature_cache, tmp_path / "b"))
    pd.testing.assert_frame_equal(metrics.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "b" / "metrics.csv").drop(columns="seconds"))
    assert json.loads((tmp_path / "b" / "test.json").read_text())["test_mae"] == result["test_mae"]


def test_a_device_that_cannot_run_is_named() -> None:
    """An unknown device name, or CUDA asked for where torch sees none, is one clear InputError naming the fix."""
    import torch

    from crystal_transfer.errors import InputError
    from crystal_transfer.training.trainer import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="not a torch device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="sees no CUDA GPU"):
            pick_device("cuda")


def test_the_paired_test_runs_one_or_two_sided() -> None:
    """scipy's paired t-test over the seeds both sides have: one-sided by default, two-sided when asked (then
    twice the one-sided p of the better side); fewer than two shared seeds give no p."""
    from crystal_transfer.report.tables import paired_p_value

    better = {0: 0.40, 1: 0.42, 2: 0.41, 9: 0.1}
    worse = {0: 0.45, 1: 0.44, 2: 0.47}
    one = paired_p_value(better, worse)
    two = paired_p_value(better, worse, "two-sided")
    assert 0 < one < 0.05 and two == pytest.approx(2 * one)
    assert paired_p_value(worse, better, "two-sided") == pytest.approx(two)
    assert paired_p_value(worse, better) > 0.95
    assert paired_p_value({0: 1.0}, {0: 2.0}) is None


def test_finetuning_with_layer_lr_decay_gives_each_layer_its_rate() -> None:
    from crystal_transfer.errors import InputError
    from crystal_transfer.experiments.transfer import build_transfer_model
    from crystal_transfer.models.cgcnn import CGCNN
    from crystal_transfer.training.trainer import TrainSettings, make_optimizer

    source = CGCNN(targets=["formation_energy_per_atom"], **ARCH, backend="torch")
    settings = TrainSettings.from_dict({**TRAIN, "layer_lr_decay": 0.5})
    model = build_transfer_model("band_gap", "finetune", 0, 0, source, layer_lr_decay=settings.layer_lr_decay)
    optimizer = make_optimizer(model, settings)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(rate) == len(named)  # every trainable parameter, once
    n = ARCH["n_conv"]
    for name, parameter in named.items():
        if name.startswith("embedding."):
            expected = 0.01 * 0.5 ** (n + 1)
        elif name.startswith("convs."):
            expected = 0.01 * 0.5 ** (n - int(name.split(".")[1]))
        else:  # conv_to_fc and the new head
            expected = 0.01
        assert rate[id(parameter)] == pytest.approx(expected), name
    plain = make_optimizer(build_transfer_model("band_gap", "finetune", 0, 0, source), TrainSettings.from_dict(TRAIN))
    assert [g["lr"] for g in plain.param_groups] == [0.01]
    with pytest.raises(InputError, match="layer_lr_decay"):
        TrainSettings.from_dict({**TRAIN, "layer_lr_decay": 1.5})


@pytest.mark.parametrize("monitor", ["val_loss", "val_mae"])
def test_the_best_epoch_and_early_stopping_follow_the_monitored_figure(matminer_graphs, feature_cache, tmp_path,
                                                                     monitor) -> None:
    """The saved epoch is the one of lowest validation loss or MAE, as ``monitor`` says, and patience counts the
    epochs without a better one of that figure."""
    command = atomsets_command(matminer_graphs, feature_cache, tmp_path / monitor)
    spec = {**json.loads(command[command.index("--spec") + 1]), "epochs": 60, "patience": 6, "monitor": monitor}
    command[command.index("--spec") + 1] = json.dumps(spec)
    run(command)
    result = json.loads((tmp_path / monitor / "test.json").read_text())
    metrics = pd.read_csv(tmp_path / monitor / "metrics.csv")
    watched = metrics["val_loss" if monitor == "val_loss" else "val_mae_band_gap"]
    assert result["best_epoch"] == int(metrics["epoch"].iloc[int(watched.to_numpy().argmin())])
    assert result["best_val_loss"] == pytest.approx(metrics["val_loss"].iloc[result["best_epoch"] - 1])
    assert result["epochs_trained"] == min(60, result["best_epoch"] + 6)


def test_a_wrong_monitor_is_named() -> None:
    from crystal_transfer.errors import InputError
    from crystal_transfer.training.trainer import TrainSettings

    with pytest.raises(InputError, match="monitor must be one of val_loss, val_mae, not 'mae'"):
        TrainSettings.from_dict({"monitor": "mae"})


def test_the_label_transform_is_the_one_asked_for(matminer_graphs, feature_cache, tmp_path) -> None:
    """Shear moduli are standardised on log10 GPa unless a transform says otherwise; ``--transform log10`` makes
    the CGCNN and the AtomSets stage learn and score log10 band gaps (the dielectric table's are all > 0), and the
    saved model says so."""
    from crystal_transfer.experiments.fit import fit_normalizers

    moduli = pd.read_csv(shared("mp2018", "labels.csv"))["G_VRH"].dropna().to_numpy()[:500, None]
    (default,) = fit_normalizers(moduli, ["G_VRH"], {"G_VRH": "GPa"})
    (plain,) = fit_normalizers(moduli, ["G_VRH"], {"G_VRH": "GPa"}, {"G_VRH": "identity"})
    assert default.transform == "log10" and default.mean == pytest.approx(np.log10(moduli).mean(), rel=1e-6)
    assert plain.transform == "identity" and plain.mean == pytest.approx(moduli.mean(), rel=1e-6)
    scratch = ["--name", "scratch", "--mode", "scratch", "--seed", "0", "--transform", "log10"]
    commands = {"cgcnn": transfer_command(matminer_graphs, tmp_path / "cgcnn", *scratch, epochs=1),
                "atomsets": [*atomsets_command(matminer_graphs, feature_cache, tmp_path / "atomsets"),
                             "--transform", "log10"]}
    for name, command in commands.items():
        run(command)
        result = json.loads((tmp_path / name / "test.json").read_text())
        card = json.loads((tmp_path / name / "model" / "model.json").read_text())
        assert result["units"] == {"band_gap": "log10 eV"} and card["normalizers"]["band_gap"]["transform"] == "log10"
        predictions = pd.read_csv(tmp_path / name / "predictions.csv")
        gaps = pd.read_parquet(matminer_graphs["table"], columns=["id", "band_gap"]).set_index("id")["band_gap"]
        np.testing.assert_allclose(predictions["target"], np.log10(gaps.loc[predictions["id"]]), rtol=1e-5)


def test_exported_features_are_the_models_own_and_round_trip(matminer_graphs, source_model, tmp_path,
                                                              mp2018_texts) -> None:
    """Issue #19 item 4: ``features`` writes one row per input crystal; at level ``crystal`` the row is the model's
    ``crystal_features`` on the pipeline's own graphs, at an atom level the mean of the frozen-feature cache's
    atom rows (and ``--per-atom`` those rows); a crystal without features keeps its row, its reason and null
    features; the file round-trips through pandas."""
    import pyarrow.parquet as pq

    from crystal_transfer.experiments.frozen_features import compute_frozen_features
    from crystal_transfer.graphs.dataset import GraphDataset
    from crystal_transfer.models.saved import load_model

    subset = tmp_path / "subset.parquet"
    pq.write_table(pq.read_table(matminer_graphs["table"]).slice(0, 40), subset)
    ids = pq.read_table(subset, columns=["id"]).column("id").to_pylist()
    model = load_model(source_model).model.eval()
    dataset = GraphDataset(matminer_graphs["graphs"], ids=ids, table=matminer_graphs["table"])
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        expected_crystal = model.crystal_features(batch).numpy()
    cache = compute_frozen_features(model, 2, dataset)
    offsets = cache["offsets"].numpy()

    command = [sys.executable, "-m", "crystal_transfer", "features", "--model", str(source_model), "--input",
               str(subset)]
    run([*command, "--level", "crystal", "--out", str(tmp_path / "crystal.parquet")])
    run([*command, "--level", "2", "--out", str(tmp_path / "level2.parquet"), "--per-atom",
         str(tmp_path / "atoms.parquet")])
    crystal = pd.read_parquet(tmp_path / "crystal.parquet")
    assert list(crystal.columns[:3]) == ["id", "n_atoms", "error"] and crystal["id"].tolist() == ids
    assert (crystal["error"] == "").all()
    np.testing.assert_allclose(crystal.iloc[:, 3:].to_numpy(), expected_crystal, rtol=1e-5, atol=1e-6)
    level2 = pd.read_parquet(tmp_path / "level2.parquet")
    pooled = np.stack([cache["features"][offsets[i]:offsets[i + 1]].numpy().mean(0) for i in range(len(ids))])
    np.testing.assert_allclose(level2.iloc[:, 3:].to_numpy(), pooled, rtol=1e-5, atol=1e-6)
    atoms = pd.read_parquet(tmp_path / "atoms.parquet")
    assert len(atoms) == offsets[-1] and atoms["id"].tolist() == [
        crystal_id for i, crystal_id in enumerate(ids) for _ in range(offsets[i + 1] - offsets[i])]
    np.testing.assert_allclose(atoms.iloc[:, 3:].to_numpy(), cache["features"].numpy(), rtol=1e-5, atol=1e-6)
    assert (level2["n_atoms"].to_numpy() == np.diff(offsets)).all()
    metadata = json.loads(pq.read_schema(tmp_path / "level2.parquet").metadata[b"crystal_transfer"])
    assert metadata["level"] == 2 and metadata["width"] == ARCH["atom_fea_len"] and metadata["pooling"] == "mean"
    assert metadata["source_weights_sha256"] == json.loads((source_model / "model.json").read_text())["weights_sha256"]
    level2.to_parquet(tmp_path / "again.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again.parquet"), level2)

    folder = tmp_path / "cifs"  # crystals without features keep their row
    folder.mkdir()
    cif_ids = list(mp2018_texts)[:5] + [list(mp2018_texts)[-1]]  # the last one holds Bi (Z 83 > max_z 80)
    for crystal_id in cif_ids:
        (folder / f"{crystal_id}.cif").write_text(mp2018_texts[crystal_id])
    (folder / "broken.cif").write_text("not a crystal")
    run([sys.executable, "-m", "crystal_transfer", "features", "--model", str(source_model), "--input", str(folder),
         "--level", "1", "--out", str(tmp_path / "folder.parquet")])
    rows = pd.read_parquet(tmp_path / "folder.parquet").set_index("id")
    assert sorted(rows.index) == sorted([*cif_ids, "broken"])
    assert rows.loc["broken", "error"].startswith("unparsable:") and rows.loc[cif_ids[-1], "error"].startswith(
        "element_above_max_z:")
    failed = rows.loc[["broken", cif_ids[-1]]]
    assert failed.iloc[:, 2:].isna().all().all()
    good = rows.drop(index=["broken", cif_ids[-1]])
    assert (good["error"] == "").all() and np.isfinite(good.iloc[:, 2:].to_numpy()).all()


def test_the_monitored_figure_is_the_loss_or_the_mae_over_each_targets_std() -> None:
    """``monitor: val_mae`` ranks epochs by the validation MAE (with several targets each over its normaliser's
    std, averaged; a target without validation labels ignored), ``val_loss`` by the loss."""
    import math
    from types import SimpleNamespace

    from crystal_transfer.training.normalizer import Normalizer
    from crystal_transfer.training.trainer import Trainer, TrainSettings

    normalizers = [Normalizer(mean=0.0, std=2.0, transform="identity", unit="eV"),
                   Normalizer(mean=1.0, std=0.5, transform="log10", unit="GPa")]
    epoch = {"loss": 0.7, "mae_a": 0.4, "mae_b": 0.1}
    trainer = SimpleNamespace(targets=["a", "b"], normalizers=normalizers)
    trainer.settings = TrainSettings(monitor="val_loss")
    assert Trainer._score(trainer, epoch) == 0.7
    trainer.settings = TrainSettings(monitor="val_mae")
    assert Trainer._score(trainer, epoch) == pytest.approx((0.4 / 2.0 + 0.1 / 0.5) / 2)
    assert Trainer._score(trainer, {**epoch, "mae_b": math.nan}) == pytest.approx(0.4 / 2.0)


def test_a_feature_cache_larger_than_its_budget_is_written_and_read_in_parts(matminer_graphs, source_model,
                                                                             tmp_path) -> None:
    """Issue #20: a cache over the part budget is written in parts as it is computed (and by save_frozen_features),
    and read a part at a time; every crystal's rows, the datasets built on it and their batches equal those of the
    cache in one file; a damaged part is named."""
    from crystal_transfer.experiments import frozen_features as ff
    from crystal_transfer.graphs.dataset import GraphDataset
    from crystal_transfer.models.saved import load_model

    dataset = GraphDataset(matminer_graphs["graphs"], targets=["band_gap"], table=matminer_graphs["table"])
    model = load_model(source_model).model
    whole = ff.compute_frozen_features(model, 2, dataset)
    budget = 64 * 1024  # bytes: every batch of 256 crystals makes a part
    streamed, saved = tmp_path / "streamed.pt", tmp_path / "saved.pt"
    ff.write_frozen_features(model, 2, dataset, streamed, {"source": "test"}, part_bytes=budget)
    ff.save_frozen_features(whole, saved, {"source": "test"}, part_bytes=budget)
    ff.save_frozen_features(whole, tmp_path / "one.pt", {"source": "test"})
    assert len(list(tmp_path.glob("streamed.part*.pt"))) > 10 and len(list(tmp_path.glob("saved.part*.pt"))) > 10
    assert not list(tmp_path.glob("one.part*"))
    offsets = whole["offsets"]
    for path in (streamed, saved):
        cache = ff.load_frozen_features(path)
        assert isinstance(cache["features"], ff.FeatureParts)
        assert cache["ids"] == whole["ids"] and torch.equal(cache["offsets"], offsets)
        assert cache["features"].shape == whole["features"].shape
        for i in range(len(whole["ids"])):
            rows = slice(int(offsets[i]), int(offsets[i + 1]))
            assert torch.equal(cache["features"][rows], whole["features"][rows])
        assert len(cache["features"].held) <= ff.PARTS_HELD
        labels = dataset._targets[:, 0]
        parted = ff.FeatureSetDataset(cache, dataset.ids, labels)
        single = ff.FeatureSetDataset(ff.load_frozen_features(tmp_path / "one.pt"), dataset.ids, labels)
        items = list(range(0, len(parted), 3))
        first, second = (data.collate([data[i] for i in items]) for data in (parted, single))
        assert torch.equal(first.features, second.features)
        assert torch.allclose(first.targets, second.targets, rtol=0, atol=0, equal_nan=True)
        cached = ff.CachedFeatureDataset(dataset, cache).collate([ff.CachedFeatureDataset(dataset, cache)[i]
                                                                  for i in items])
        assert torch.equal(cached.atom_fea, first.features)
    part = tmp_path / "streamed.part0003.pt"
    part.write_bytes(part.read_bytes()[:-10])
    cache = ff.load_frozen_features(streamed)
    with pytest.raises(InputError, match="streamed.part0003.pt is missing or damaged"):
        for i in range(len(whole["ids"])):
            cache["features"][int(offsets[i]):int(offsets[i + 1])]


def test_a_long_pass_logs_its_progress_with_the_rate_and_a_short_one_does_not() -> None:
    """Issue #20: off a terminal, a pass of at least PROGRESS_LOG_FROM crystals logs ten lines with crystals/s; a
    shorter one none (its epoch line is enough)."""
    from crystal_transfer.progress import Counter
    from crystal_transfer.training.trainer import PROGRESS_LOG_FROM

    lines: list[str] = []
    long = Counter(PROGRESS_LOG_FROM * 2, "epoch 1 train", lines.append, log_from=PROGRESS_LOG_FROM)
    for _ in range(PROGRESS_LOG_FROM * 2 // 64):
        long.advance(64)
    long.advance(PROGRESS_LOG_FROM * 2 % 64)
    assert len(lines) == 10 and lines[-1].startswith(f"epoch 1 train: {PROGRESS_LOG_FROM * 2}/")
    assert all(line.endswith("/s)") for line in lines)
    short: list[str] = []
    counter = Counter(PROGRESS_LOG_FROM - 1, "epoch 1 val", short.append, log_from=PROGRESS_LOG_FROM)
    counter.advance(PROGRESS_LOG_FROM - 1)
    assert short == []
