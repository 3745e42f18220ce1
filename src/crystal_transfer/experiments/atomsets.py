"""AtomSets-style transfer (Chen & Ong, 2021): frozen features of a pretrained CGCNN feed a small model.

Features come from :func:`crystal_transfer.experiments.frozen_features.compute_frozen_features` at a level: ``0`` (the
element embedding), ``k`` (after k convolutions) or ``crystal`` (the pooled crystal vector after
``conv_to_fc``). A set model f(X) = ρ(pool φ(x)) is trained on the atom features (mean or sum pooling); on
the crystal vector it is an MLP. Training is on cached features only, so a learning-curve point costs seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crystal_transfer.atomic import atomic_path, write_csv, write_json
from crystal_transfer.data.table import label_values, read_table
from crystal_transfer.errors import InputError, MissingError
from crystal_transfer.experiments.fit import write_predictions
from crystal_transfer.training.normalizer import Normalizer


@dataclass
class SetModelSettings:
    """Hyperparameters of the set model and its training (the config's ``atomsets`` section)."""

    hidden: int = 64
    pooling: str = "mean"
    epochs: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 50


class SetModel(nn.Module):
    """ρ(pool_i φ(x_i)): per-atom MLP, mean or sum over each crystal's atoms, MLP to one output."""

    def __init__(self, in_features: int, hidden: int = 64, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "sum"):
            raise InputError(f"pooling must be 'mean' or 'sum', not {pooling!r}")
        self.pooling = pooling
        self.phi = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.rho = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
        """(count,) outputs for ``features`` (N, F) of atoms belonging to crystals ``segment`` (N,)."""
        atoms = self.phi(features)
        pooled = atoms.new_zeros(count, atoms.shape[1]).index_add_(0, segment, atoms)
        if self.pooling == "mean":
            pooled = pooled / torch.bincount(segment, minlength=count).clamp_min(1).unsqueeze(1).to(atoms.dtype)
        return self.rho(pooled).squeeze(1)


class FeatureSets:
    """Cached features of a list of crystals, batched by concatenation."""

    def __init__(self, cache: dict[str, Any], ids: list[str], targets: np.ndarray) -> None:
        row = {crystal_id: index for index, crystal_id in enumerate(cache["ids"])}
        missing = [i for i in ids if i not in row]
        if missing:
            raise MissingError(f"{len(missing)} crystals have no cached features, e.g. {missing[:3]}")
        self.features = cache["features"]
        self.offsets = cache["offsets"]
        self.rows = torch.tensor([row[i] for i in ids], dtype=torch.long)
        self.targets = torch.as_tensor(targets, dtype=torch.float32)
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, segment, targets) of the crystals at positions ``index``."""
        rows = self.rows[index]
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        sizes = ends - starts
        atom_rows = torch.repeat_interleave(starts - torch.cumsum(sizes, 0) + sizes, sizes) + torch.arange(
            int(sizes.sum())
        )
        segment = torch.repeat_interleave(torch.arange(len(rows)), sizes)
        return self.features[atom_rows], segment, self.targets[index]


def _mae(model: SetModel, data: FeatureSets, normalizer: Normalizer) -> tuple[float, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        features, segment, targets = data.batch(torch.arange(len(data)))
        predictions = normalizer.denormalize(model(features, segment, len(data)))
    return float((predictions - targets).abs().mean()), predictions


def train_set_model(cache: dict[str, Any], table: str | Path, split: dict[str, list[str]], target: str,
                    settings: SetModelSettings, seed: int, out_dir: str | Path) -> dict[str, Any]:
    """Train a set model on cached features; write metrics.csv, predictions.csv, model.pt, test.json."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    frame = read_table(table, columns=["id", target])
    value_of = dict(zip(frame.column("id").to_pylist(), label_values(frame, target), strict=True))
    data = {part: FeatureSets(cache, split[part], np.array([value_of[i] for i in split[part]]))
            for part in ("train", "val", "test")}
    normalizer = Normalizer.fit(data["train"].targets.numpy())
    torch.manual_seed(seed)
    model = SetModel(cache["features"].shape[1], settings.hidden, settings.pooling)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best = (math.inf, 0, None)
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(len(data["train"]), generator=generator)
        losses = []
        for start in range(0, len(order), settings.batch_size):
            index = order[start : start + settings.batch_size]
            features, segment, targets = data["train"].batch(index)
            loss = nn.functional.mse_loss(model(features, segment, len(index)), normalizer.normalize(targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss) * len(index))
        val_mae, _ = _mae(model, data["val"], normalizer)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(order), "val_mae": val_mae})
        if val_mae < best[0]:
            best = (val_mae, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= settings.patience:
            break
    model.load_state_dict(best[2])
    test_mae, predictions = _mae(model, data["test"], normalizer)
    write_csv(out_dir / "metrics.csv", list(history[0]), history)
    write_predictions(
        out_dir / "predictions.csv",
        [
            (i, target, float(t), float(p))
            for i, t, p in zip(data["test"].ids, data["test"].targets, predictions, strict=True)
        ],
    )
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    result = {"mode": "atomsets", "seed": seed, "target": target, "train_size": len(data["train"]),
              "test_mae": test_mae, "best_epoch": best[1], "best_val_mae": best[0], "n_val": len(data["val"]),
              "n_test": len(data["test"]), "level": cache["depth"], "pooling": settings.pooling,
              "parameters": sum(p.numel() for p in model.parameters()),
              "seconds": round(time.perf_counter() - started, 2)}
    write_json(out_dir / "test.json", result)
    return result


def run(name: str, cache: str | Path, table: str | Path, split: str | Path, target: str, spec: dict[str, Any],
        out: str | Path, seed: int = 0, train_size: int = 0, log=print) -> dict[str, Any]:
    """The ``atomsets`` stage: a set model on the cached features of source ``name``, one seed and size."""
    from crystal_transfer.data.split import read_split
    from crystal_transfer.experiments.frozen_features import load_frozen_features

    settings = SetModelSettings(**spec)
    parts = read_split(split)
    if train_size:
        parts = {**parts, "train": parts["train"][:train_size]}
    result = train_set_model(load_frozen_features(cache), table, parts, target, settings, seed, out)
    result["source"] = name
    write_json(Path(out) / "test.json", result)
    log(f"AtomSets on {name} features at level {result['level']}: {result['train_size']} training crystals, "
        f"test MAE {result['test_mae']:.4f} ({result['seconds']} s)")
    return result
