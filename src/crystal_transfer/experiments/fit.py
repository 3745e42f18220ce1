"""Training jobs of the pipeline: pretraining a model on a dataset, and one transfer run.

Both write the same things into their output folder: ``metrics.csv`` (per epoch), ``test.json`` (test MAE
per target and the run's identity), ``predictions.csv`` (test set: id, target, prediction, in the units of the
MAE) and ``model/`` (the saved model, best on validation).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystal_transfer.atomic import write_json, write_text
from crystal_transfer.data.labels import transform_of
from crystal_transfer.data.table import label_values, read_table, table_units
from crystal_transfer.graphs.dataset import GraphDataset
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.saved import fingerprint_ids, load_model, model_graph_settings, save_model
from crystal_transfer.training.normalizer import Normalizer
from crystal_transfer.training.trainer import Trainer, TrainSettings

TEST_FILE = "test.json"
PREDICTIONS_FILE = "predictions.csv"
MODEL_DIR = "model"


def pretrain_split(
    table_path: str | Path, targets: Sequence[str], subsample: int, val: float, test: float, seed: int
) -> dict[str, list[str]]:
    """Ids with at least one target label, sorted, shuffled with ``seed``, optionally subsampled, then cut."""
    table = read_table(table_path, columns=["id", *targets])
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    labelled = np.zeros(len(ids), dtype=bool)
    for target in targets:
        labelled |= np.isfinite(label_values(table, target))
    usable = np.sort(ids[labelled].astype(str))
    order = np.random.default_rng(seed).permutation(len(usable))
    chosen = usable[order]
    if subsample:
        if subsample > len(chosen):
            raise ValueError(f"subsample={subsample} but only {len(chosen)} crystals have any of {list(targets)}")
        chosen = chosen[:subsample]
    n_val, n_test = int(round(val * len(chosen))), int(round(test * len(chosen)))
    return {
        "val": chosen[:n_val].tolist(),
        "test": chosen[n_val : n_val + n_test].tolist(),
        "train": chosen[n_val + n_test :].tolist(),
    }


def fit_normalizers(dataset: GraphDataset, targets: Sequence[str], units: dict[str, str]) -> list[Normalizer]:
    """One normaliser per target, fitted on the training crystals' labels only."""
    values = dataset._targets  # (n, T) physical units, NaN where missing
    return [Normalizer.fit(values[:, i], transform_of(t), units.get(t, "")) for i, t in enumerate(targets)]


def evaluate(trainer: Trainer, dataset: GraphDataset, out_dir: Path) -> dict[str, float]:
    """Test MAE per target (transformed units) and a predictions CSV."""
    ids, predictions, targets = trainer.predict(dataset)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label", "target", "prediction"])
    maes = {}
    for column, name in enumerate(trainer.targets):
        present = ~torch.isnan(targets[:, column])
        maes[name] = float((predictions[present, column] - targets[present, column]).abs().mean())
        for index in torch.nonzero(present).flatten().tolist():
            writer.writerow(
                [ids[index], name, f"{float(targets[index, column]):.6g}", f"{float(predictions[index, column]):.6g}"]
            )
    write_text(out_dir / PREDICTIONS_FILE, buffer.getvalue())
    return maes


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
) -> dict[str, Any]:
    """Train ``model`` on ``split`` and write metrics, test results, predictions and the saved model."""
    out_dir = Path(out_dir)
    targets = list(model.targets)
    units = table_units(table)
    data = datasets or {
        part: GraphDataset(graphs, ids=split[part], targets=targets, table=table) for part in ("train", "val", "test")
    }
    normalizers = fit_normalizers(
        data["train"].graphs if hasattr(data["train"], "graphs") else data["train"], targets, units
    )
    fingerprint = fingerprint_ids(split["train"]) + json.dumps(record, sort_keys=True)
    collate = data["train"].collate
    trainer = Trainer(model, normalizers, settings, out_dir, collate, log=log, run_fingerprint=fingerprint)
    started = time.perf_counter()
    fit = trainer.fit(data["train"], data["val"])
    maes = evaluate(trainer, data["test"], out_dir)
    graph_settings = data["train"].graphs.settings if hasattr(data["train"], "graphs") else data["train"].settings
    save_model(
        out_dir / MODEL_DIR,
        trainer.model,
        model_graph_settings(
            trainer.model, graph_settings.radius, graph_settings.max_num_nbr, graph_settings.cgcnn_padding
        ),
        dict(zip(targets, normalizers, strict=True)),
        training={**record, "settings": settings.__dict__},
        train_ids=split["train"],
    )
    result = {
        **record,
        "targets": targets,
        "test_mae": maes[targets[0]] if len(targets) == 1 else None,
        "test_mae_per_target": maes,
        "units": {
            t: ("log10 " + units.get(t, "")) if transform_of(t) == "log10" else units.get(t, "") for t in targets
        },
        "best_epoch": fit["best_epoch"],
        "best_val_loss": fit["val_loss"],
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


def _unit(target: str, units: dict[str, str]) -> str:
    unit = units.get(target, "")
    return f"log10 {unit}" if transform_of(target) == "log10" else unit


def source_model(path: str | Path | None) -> CGCNN | None:
    """The pretrained network of a saved model folder (None for 'none')."""
    if path in (None, "", "none"):
        return None
    return load_model(path).model
