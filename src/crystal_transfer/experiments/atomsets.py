"""AtomSets-style transfer (Chen & Ong, 2021): frozen features of a pretrained CGCNN feed a small set model.

Features come from :func:`crystal_transfer.experiments.frozen_features.compute_frozen_features` at a level: ``0`` (the
element embedding), ``k`` (after k convolutions) or ``crystal`` (the pooled crystal vector after
``conv_to_fc``). The :class:`~crystal_transfer.models.set_model.SetModel` trains on the cached features only, so
a learning-curve point costs seconds. It trains through the same :class:`~crystal_transfer.training.trainer.Trainer`
as every CGCNN run (Adam, early stopping on the validation loss) and writes the same outputs: ``metrics.csv``,
``test.json``, ``predictions.csv`` and ``model/`` (the saved-model format, the features it reads in the card).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystal_transfer.data.table import label_values, read_table, table_units
from crystal_transfer.errors import InputError
from crystal_transfer.experiments.fit import fit_normalizers, train_and_save
from crystal_transfer.experiments.frozen_features import FeatureSetDataset
from crystal_transfer.models.set_model import SetModel
from crystal_transfer.training.trainer import TrainSettings, settings_from_dict


@dataclass
class SetModelSettings:
    """Hyperparameters of the set model and its training (the config's ``learning_curves.atomsets``)."""

    hidden: int = 64
    pooling: str = "mean"
    epochs: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 50
    monitor: str = "val_loss"  # what picks the best epoch and what patience watches: val_loss or val_mae

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SetModelSettings:
        """Settings from the config section (``level`` is the cache's business); unknown keys are an error."""
        return settings_from_dict(cls, data, "atomsets", ignored=frozenset({"level"}))

    def train_settings(self, seed: int) -> TrainSettings:
        """The trainer's settings: Adam at a constant learning rate, early stopping, on the CPU (the model is
        small and its inputs are cached: a device round trip costs more than it saves, and CPU is deterministic)."""
        return TrainSettings(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="adam",
            lr=self.lr,
            weight_decay=self.weight_decay,
            lr_milestones=[],
            seed=seed,
            device="cpu",
            patience=self.patience,
            monitor=self.monitor,
        )


def feature_inputs(cache: dict[str, Any]) -> dict[str, Any]:
    """What a set model on ``cache`` reads, for its saved card: source model, level, feature width."""
    provenance = cache.get("provenance", {})
    return {
        "kind": "frozen_features",
        "source": provenance.get("source"),
        "source_weights_sha256": provenance.get("source_weights_sha256"),
        "level": cache["depth"],
        "feature_width": int(cache["features"].shape[1]),
    }


def run(name: str, cache: str | Path, table: str | Path, split: str | Path, target: str, spec: dict[str, Any],
        out: str | Path, seed: int = 0, train_size: int = 0, log=print, transform: str | None = None) -> dict[str, Any]:
    """The ``atomsets`` stage: a set model on the cached features of source ``name``, one seed and size; the
    label learned transformed by ``transform`` (identity or log10; default: the label's own)."""
    from crystal_transfer.data.split import read_split
    from crystal_transfer.experiments.frozen_features import load_frozen_features

    settings = SetModelSettings.from_dict(spec)
    parts = read_split(split)
    if train_size:
        parts = {**parts, "train": parts["train"][:train_size]}
    features = load_frozen_features(cache)
    frame = read_table(table, columns=["id", target])
    value_of = dict(zip(frame.column("id").to_pylist(), label_values(frame, target), strict=True))
    data = {
        part: FeatureSetDataset(features, parts[part], np.array([value_of[i] for i in parts[part]]))
        for part in ("train", "val", "test")
    }
    units = table_units(table)
    if len(data["train"]) < 2 or len(data["test"]) == 0:
        raise InputError(f"{cache}: the feature source rejected too many crystals of {split} "
                         f"({len(data['train'])} training and {len(data['test'])} test crystals left)")
    normalizers = fit_normalizers(data["train"].targets.numpy(), [target], units,
                                  {target: transform} if transform else None)
    inputs = feature_inputs(features)
    torch.manual_seed(seed)
    model = SetModel(inputs["feature_width"], settings.hidden, settings.pooling, targets=[target])
    record = {
        "source": name,
        "mode": "atomsets",
        "seed": seed,
        "target": target,
        "train_size": len(parts["train"]),  # the planned size; left_out says how many of them the source refused
        "level": features["depth"],
        "pooling": settings.pooling,
        "hidden": settings.hidden,
        "features": inputs,
        # crystals of the split the feature source rejected (see the cache's rejected list), per part
        "left_out": {part: len(data[part].left_out) for part in data},
    }
    result = train_and_save(
        model, data, normalizers, units, settings.train_settings(seed), out, record, data["train"].ids, log=log,
        inputs=inputs,
    )
    log(f"AtomSets on {name} features at level {result['level']}: {result['train_size']} training crystals, "
        f"test MAE {result['test_mae']:.4f} {result['units'][target]} ({result['seconds']} s)")
    return result
