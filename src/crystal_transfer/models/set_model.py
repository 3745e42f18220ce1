"""The AtomSets set model (Chen & Ong, 2021) and the batch of cached frozen features it consumes.

f(X) = ρ(pool_i φ(x_i)): a per-atom MLP φ, mean or sum over each crystal's atoms, an MLP ρ to one output per
target. Its inputs are not graphs but features a frozen CGCNN trunk computed once
(:mod:`crystal_transfer.experiments.frozen_features`): per-atom features after k convolutions, or the pooled
crystal vector (one row per crystal, where the model is an MLP). Saved in the format of
:mod:`crystal_transfer.models.saved` with the features it takes in the card's ``inputs`` instead of graph settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from crystal_transfer.errors import InputError

POOLINGS = ("mean", "sum")


@dataclass
class FeatureBatch:
    """A batch of crystals as cached features.

    Attributes:
        features: (N, F) float32, the feature rows of every crystal in the batch, stacked.
        segment: (N,) long, index of each row's crystal in the batch (0 .. num_crystals - 1).
        num_crystals: number of crystals B.
        targets: (B, T) float32, labels in physical units, NaN where missing.
        ids: crystal ids, length B.
    """

    features: torch.Tensor
    segment: torch.Tensor
    num_crystals: int
    targets: torch.Tensor
    ids: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FeatureBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            moved[item.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return FeatureBatch(**moved)


class SetModel(nn.Module):
    """ρ(pool_i φ(x_i)): per-row MLP, mean or sum over each crystal's rows, MLP to one output per target."""

    takes_graphs = False  # its inputs are cached features (the saved card records which), not graphs

    def __init__(
        self, in_features: int, hidden: int = 64, pooling: str = "mean", targets: Sequence[str] = ("target",)
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.pooling = pooling
        self.targets = list(targets)
        self._init_args: dict[str, Any] = {
            "in_features": int(in_features),
            "hidden": int(hidden),
            "pooling": pooling,
            "targets": list(targets),
        }
        self.phi = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.rho = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, len(self.targets)))

    @property
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``SetModel(**model.init_args)`` rebuilds the model."""
        return json.loads(json.dumps(self._init_args))

    def parameter_count(self, trainable_only: bool = False) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        """(B, T) standardised predictions for the crystals of ``batch``."""
        rows = self.phi(batch.features)
        count = batch.num_crystals
        pooled = rows.new_zeros(count, rows.shape[1]).index_add_(0, batch.segment, rows)
        if self.pooling == "mean":
            sizes = torch.bincount(batch.segment, minlength=count).clamp_min(1).unsqueeze(1).to(rows.dtype)
            pooled = pooled / sizes
        return self.rho(pooled)
