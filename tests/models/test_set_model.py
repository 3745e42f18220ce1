"""The AtomSets set model on synthetic cached features: pooling, batching, the saved-model format, and training
through the one Trainer (early stopping, resume after a kill with the same numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crystal_transfer.errors import InputError
from crystal_transfer.experiments.frozen_features import FeatureSetDataset
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.saved import check_graph_settings, load_model, save_model
from crystal_transfer.models.set_model import FeatureBatch, SetModel
from crystal_transfer.training.normalizer import Normalizer
from crystal_transfer.training.trainer import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE, Trainer, TrainSettings


@pytest.fixture(autouse=True)
def one_thread():
    """Batches of a few hundred rows: intra-op threads only add overhead (large on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


INPUTS = {"kind": "frozen_features", "source": "src/model", "source_weights_sha256": "ab" * 32, "level": 2,
          "feature_width": 5}


def synthetic_cache(count: int = 90, width: int = 5, seed: int = 0) -> tuple[dict, np.ndarray]:
    """A feature cache of ``count`` crystals of 1-6 atoms and a label that depends on the atoms' features."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 7, (count,), generator=generator)
    offsets = torch.zeros(count + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(sizes, 0)
    features = torch.randn(int(offsets[-1]), width, generator=generator)
    labels = np.array([float(features[offsets[i] : offsets[i + 1], 0].mean()) * 2 + 1 for i in range(count)])
    cache = {"ids": [f"c{i}" for i in range(count)], "offsets": offsets, "features": features, "depth": 2}
    return cache, labels


def datasets(cache: dict, labels: np.ndarray) -> dict[str, FeatureSetDataset]:
    cuts = {"train": slice(0, 60), "val": slice(60, 75), "test": slice(75, 90)}
    return {part: FeatureSetDataset(cache, cache["ids"][cut], labels[cut]) for part, cut in cuts.items()}


def test_pooling_and_batches_gather_each_crystals_rows() -> None:
    cache, labels = synthetic_cache()
    data = FeatureSetDataset(cache, ["c3", "c0", "c7"], labels[[3, 0, 7]])
    other = FeatureSetDataset(cache, ["c1"], labels[[1]])
    batch = other.collate([data[2], data[0]])  # a batch does not depend on the dataset whose collate makes it
    offsets = cache["offsets"]
    expected = torch.cat([cache["features"][offsets[7] : offsets[8]], cache["features"][offsets[3] : offsets[4]]])
    assert torch.equal(batch.features, expected) and batch.ids == ["c7", "c3"] and batch.num_crystals == 2
    assert batch.targets.shape == (2, 1) and batch.targets[0, 0] == pytest.approx(labels[7])
    torch.manual_seed(0)
    for pooling in ("mean", "sum"):
        model = SetModel(5, hidden=8, pooling=pooling, targets=["a", "b"])
        outputs = model(batch)
        assert outputs.shape == (2, 2)
        for index, crystal in enumerate((7, 3)):
            alone = FeatureBatch(cache["features"][offsets[crystal] : offsets[crystal + 1]],
                                 torch.zeros(int(offsets[crystal + 1] - offsets[crystal]), dtype=torch.long), 1,
                                 torch.zeros(1, 2))
            assert torch.allclose(outputs[index], model(alone)[0], atol=1e-6)
    with pytest.raises(InputError, match="pooling"):
        SetModel(5, pooling="max")
    with pytest.raises(Exception, match="no cached features"):
        FeatureSetDataset(cache, ["nope"], np.zeros(1))


def test_saved_set_model_round_trip(tmp_path: Path) -> None:
    cache, labels = synthetic_cache()
    data = FeatureSetDataset(cache, cache["ids"], labels)
    batch = data.collate([data[i] for i in range(20)])
    torch.manual_seed(1)
    model = SetModel(5, hidden=8, pooling="sum", targets=["band_gap"])
    normalizers = {"band_gap": Normalizer(1.2, 0.7, unit="eV")}
    folder = save_model(tmp_path / "m", model, None, normalizers, training={"epochs": 3}, train_ids=cache["ids"],
                        inputs=INPUTS)
    card = json.loads((folder / "model.json").read_text())
    assert card["architecture"] == {"class": "SetModel", "init_args": model.init_args}
    assert card["graph_settings"] is None and card["inputs"] == INPUTS
    assert card["data_fingerprint"]["num_ids"] == len(cache["ids"])
    loaded = load_model(folder)
    assert isinstance(loaded.model, SetModel) and loaded.inputs == INPUTS and loaded.graph_settings is None
    with torch.no_grad():
        assert torch.equal(loaded.model(batch), model.eval()(batch))
    assert torch.allclose(loaded.predict(batch)["band_gap"], model(batch)[:, 0].detach() * 0.7 + 1.2)
    with pytest.raises(InputError, match="does not take graphs"):
        check_graph_settings(loaded.graph_settings, {"radius": 8.0, "max_num_nbr": 12})
    with pytest.raises(ValueError, match="does not take graphs"):
        save_model(tmp_path / "bad", model, None, normalizers)
    with pytest.raises(ValueError, match="graph settings are required"):
        save_model(tmp_path / "bad", CGCNN(n_conv=1), None, {"target": Normalizer(0.0, 1.0)}, inputs=INPUTS)


def train(out: Path, settings: TrainSettings, log=lambda _: None) -> tuple[Trainer, dict]:
    cache, labels = synthetic_cache()
    data = datasets(cache, labels)
    torch.manual_seed(settings.seed)
    model = SetModel(5, hidden=16, targets=["y"])
    normalizers = [Normalizer.fit(data["train"].targets.numpy())]
    trainer = Trainer(model, normalizers, settings, out, data["train"].collate, log=log, run_fingerprint="synthetic")
    return trainer, trainer.fit(data["train"], data["val"])


def test_set_model_trains_through_the_trainer_and_stops_early(tmp_path: Path) -> None:
    settings = TrainSettings(epochs=200, batch_size=16, optimizer="adam", lr=3e-3, lr_milestones=[], device="cpu",
                             patience=5)
    trainer, fit = train(tmp_path / "a", settings)
    metrics = pd.read_csv(tmp_path / "a" / METRICS_FILE)
    assert len(metrics) == fit["best_epoch"] + 5 < 200  # stopped after 5 epochs without a better val loss
    assert metrics["val_loss"].idxmin() + 1 == fit["best_epoch"]
    assert metrics["train_loss"].iloc[-1] < 0.5 * metrics["train_loss"].iloc[0]
    assert (tmp_path / "a" / BEST_FILE).is_file() and (tmp_path / "a" / CHECKPOINT_FILE).is_file()
    _, again = train(tmp_path / "b", settings)  # same seed on CPU: the same numbers
    pd.testing.assert_frame_equal(metrics.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "b" / METRICS_FILE).drop(columns="seconds"))
    assert pd.read_csv(tmp_path / "a" / METRICS_FILE).columns.tolist()[:4] == ["epoch", "lr", "train_loss", "val_loss"]
    with pytest.raises(InputError, match="patience"):
        TrainSettings(patience=-1)


class Killed(Exception):
    pass


def test_killed_set_model_run_resumes_to_the_same_numbers(tmp_path: Path) -> None:
    settings = TrainSettings(epochs=40, batch_size=16, optimizer="adam", lr=3e-3, lr_milestones=[], device="cpu",
                             seed=4, patience=8)
    whole_trainer, whole = train(tmp_path / "whole", settings)

    def kill_after_epoch_6(line: str) -> None:  # the log line comes after the epoch's checkpoint is written
        if line.startswith("epoch 6/"):
            raise Killed

    with pytest.raises(Killed):
        train(tmp_path / "killed", settings, log=kill_after_epoch_6)
    assert len(pd.read_csv(tmp_path / "killed" / METRICS_FILE)) == 6
    lines: list[str] = []
    resumed_trainer, resumed = train(tmp_path / "killed", settings, log=lines.append)
    assert lines[0].startswith("resuming from") and "epoch 6 of 40 done" in lines[0]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / METRICS_FILE).drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "killed" / METRICS_FILE).drop(columns="seconds"))
    assert resumed["best_epoch"] == whole["best_epoch"]
    cache, labels = synthetic_cache()
    test = datasets(cache, labels)["test"]
    ids, predictions, targets = resumed_trainer.predict(test)
    assert ids == test.ids and torch.equal(targets, test.targets)
    assert torch.equal(predictions, whole_trainer.predict(test)[1])
