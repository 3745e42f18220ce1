"""One training run of a model on a split, shared by the pretraining, transfer and atomsets stages.

:func:`run_training` trains a CGCNN on graphs; :func:`train_and_save` is the part every model shares (the set
model of :mod:`crystal_transfer.experiments.atomsets` calls it directly). Every run writes the same things into
its output folder: ``metrics.csv`` (per epoch), ``test.json`` (test MAE per target and the run's identity),
``predictions.csv`` (test set: id, target, prediction, in the units of the MAE) and ``model/`` (the saved model,
best on validation).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from crystal_transfer.atomic import write_csv, write_json
from crystal_transfer.data.labels import transform_of
from crystal_transfer.data.table import table_filters, table_units
from crystal_transfer.errors import InputError
from crystal_transfer.graphs.dataset import GraphDataset
from crystal_transfer.kernels import native
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.saved import data_fingerprint, model_graph_settings, save_model
from crystal_transfer.training.normalizer import Normalizer
from crystal_transfer.training.trainer import Trainer, TrainSettings

TEST_FILE = "test.json"
PREDICTIONS_FILE = "predictions.csv"
MODEL_DIR = "model"


def fit_normalizers(values: np.ndarray, targets: Sequence[str], units: dict[str, str],
                    transforms: Mapping[str, str] | None = None) -> list[Normalizer]:
    """One normaliser per target, fitted on the training crystals' labels ``values`` (n, T) only, of the label
    transformed as ``transforms`` says (default: the label's own, log10 for the moduli); a target that cannot be
    standardised (too few labels, all equal, non-positive values under log10) is named."""
    normalizers = []
    for i, target in enumerate(targets):
        transform = (transforms or {}).get(target) or transform_of(target)
        try:
            normalizers.append(Normalizer.fit(values[:, i], transform, units.get(target, "")))
        except InputError as exc:
            labelled = int(np.isfinite(values[:, i]).sum())
            raise InputError(
                f"target '{target}': cannot standardise its labels over the {labelled} labelled training crystals "
                f"({exc}); choose a split with more, and varied, {target} labels"
            ) from None
    return normalizers


def evaluate(trainer: Trainer, dataset: Dataset, out_dir: Path) -> dict[str, float]:
    """Test MAE per target (transformed units) and a predictions CSV."""
    ids, predictions, targets = trainer.predict(dataset)
    maes, rows = {}, []
    for column, name in enumerate(trainer.targets):
        present = ~torch.isnan(targets[:, column])
        maes[name] = float((predictions[present, column] - targets[present, column]).abs().mean())
        rows += [
            (ids[index], name, float(targets[index, column]), float(predictions[index, column]))
            for index in torch.nonzero(present).flatten().tolist()
        ]
    write_predictions(out_dir / PREDICTIONS_FILE, rows)
    return maes


def write_predictions(path: str | Path, rows: Sequence[tuple[str, str, float, float]]) -> None:
    """The test-set predictions of a run: ``id, label, target, prediction`` (6 significant digits)."""
    write_csv(path, ["id", "label", "target", "prediction"], ((i, n, f"{t:.6g}", f"{p:.6g}") for i, n, t, p in rows))


def run_training(
    model: CGCNN,
    graphs: str | Path,
    table: str | Path,
    split: dict[str, list[str]],
    settings: TrainSettings,
    out_dir: str | Path,
    record: dict[str, Any],
    datasets: dict[str, Any] | None = None,
    log=print,
    transforms: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``split`` and write metrics, test results, predictions and the saved model; labels
    are learned transformed as ``transforms`` says (default: each label's own, :func:`fit_normalizers`)."""
    targets = list(model.targets)
    units = table_units(table)
    data = datasets or {
        part: GraphDataset(graphs, ids=split[part], targets=targets, table=table) for part in ("train", "val", "test")
    }
    train_graphs = data["train"].graphs if hasattr(data["train"], "graphs") else data["train"]
    normalizers = fit_normalizers(train_graphs._targets, targets, units, transforms)
    graph_settings = train_graphs.settings
    saved_graph_settings = model_graph_settings(
        model, graph_settings.radius, graph_settings.max_num_nbr, graph_settings.cgcnn_padding
    )
    return train_and_save(
        model, data, normalizers, units, settings, out_dir, record, split["train"], log=log,
        graph_settings=saved_graph_settings, data_filters=table_filters(table),
    )


def train_and_save(
    model: nn.Module,
    data: Mapping[str, Dataset],
    normalizers: Sequence[Normalizer],
    units: dict[str, str],
    settings: TrainSettings,
    out_dir: str | Path,
    record: dict[str, Any],
    train_ids: Sequence[str],
    log=print,
    graph_settings: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    data_filters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` (train, val, test datasets with a ``collate``) through the :class:`Trainer`;
    write metrics, ``test.json``, predictions and the saved model (with ``graph_settings`` or ``inputs``, and the
    data stage's ``data_filters`` that ``predict`` applies to new crystals)."""
    # long: one run's outputs (metrics, test.json, predictions, the saved model) are written in one place
    out_dir = Path(out_dir)
    targets = list(model.targets)
    # how each label is learned is part of the run: a checkpoint of the same run on another scale is not resumed
    record = {**record, "transforms": {t: n.transform for t, n in zip(targets, normalizers, strict=True)}}
    identity = data_fingerprint(train_ids)
    fingerprint = identity["sha256"] + json.dumps(record, sort_keys=True)
    collate = data["train"].collate
    trainer = Trainer(model, normalizers, settings, out_dir, collate, log=log, run_fingerprint=fingerprint)
    backend = getattr(model, "backend", None)  # graph models only
    if backend:
        log(f"model backend: {backend}" + (f" ({native.describe()})" if backend == "compiled" else ""))
    started = time.perf_counter()
    fit = trainer.fit(data["train"], data["val"])
    maes = evaluate(trainer, data["test"], out_dir)
    save_model(
        out_dir / MODEL_DIR,
        trainer.model,
        graph_settings,
        dict(zip(targets, normalizers, strict=True)),
        training={**record, "settings": settings.__dict__, **({"data_filters": dict(data_filters or {})})},
        inputs=inputs,
        fingerprint=identity,
    )
    best_row = next(row for row in fit["history"] if row["epoch"] == fit["best_epoch"])
    result = {
        **record,
        "targets": targets,
        "test_mae": maes[targets[0]] if len(targets) == 1 else None,
        "test_mae_per_target": maes,
        "units": {
            t: ("log10 " + units.get(t, "")) if n.transform == "log10" else units.get(t, "")
            for t, n in zip(targets, normalizers, strict=True)
        },
        "best_epoch": fit["best_epoch"],
        "best_val_loss": fit["val_loss"],
        "best_val_mae": best_row[f"val_mae_{targets[0]}"] if len(targets) == 1 else None,
        "epochs_trained": len(fit["history"]),
        "n_train": len(data["train"]),
        "n_val": len(data["val"]),
        "n_test": len(data["test"]),
        "trainable_parameters": trainer.model.parameter_count(trainable_only=True),
        "parameters": trainer.model.parameter_count(),
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(trainer.device),
    }
    write_json(out_dir / TEST_FILE, result)
    log("test MAE: " + ", ".join(f"{t} {maes[t]:.4f} {result['units'][t]}" for t in targets))
    return result
