"""Per-target standardisation, optionally of log10 values (elastic moduli), fitted on training labels only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from crystal_transfer.data.labels import TRANSFORMS
from crystal_transfer.errors import InputError

ArrayLike = TypeVar("ArrayLike", torch.Tensor, np.ndarray)


def _log10(values: ArrayLike) -> ArrayLike:
    positive = values > 0
    missing = values != values  # NaN: a missing label stays missing
    bad = ~(positive | missing)
    if bool(bad.any()):
        raise InputError(f"log10 transform needs positive values; got {int(bad.sum())} that are <= 0")
    return torch.log10(values) if isinstance(values, torch.Tensor) else np.log10(values)


def _exp10(values: ArrayLike) -> ArrayLike:
    return torch.pow(10.0, values) if isinstance(values, torch.Tensor) else np.power(10.0, values)


@dataclass(frozen=True)
class Normalizer:
    """Standardises one target: z = (t(x) - mean) / std with t the identity or log10.

    ``mean`` and ``std`` are in transformed units (e.g. log10 GPa); ``unit`` is the unit of x (e.g. GPa).
    """

    mean: float
    std: float
    transform: str = "identity"
    unit: str = ""

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise InputError(f"transform must be one of {TRANSFORMS}, not {self.transform!r}")
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise InputError(f"normaliser needs a finite mean and a positive std, got {self.mean}, {self.std}")

    @classmethod
    def fit(cls, values: Any, transform: str = "identity", unit: str = "") -> Normalizer:
        """Fit mean and (unbiased, as CGCNN) std on training ``values`` in physical units; NaN are ignored."""
        array = np.asarray(values, dtype=np.float64).ravel()
        array = array[~np.isnan(array)]
        transformed = _log10(array) if transform == "log10" else array
        if transformed.size < 2:
            raise InputError(f"need at least 2 labelled values to fit a normaliser, got {transformed.size}")
        return cls(float(transformed.mean()), float(transformed.std(ddof=1)), transform, unit)

    def forward_transform(self, values: ArrayLike) -> ArrayLike:
        """Physical units to transformed units (log10 for moduli); NaN stays NaN."""
        return _log10(values) if self.transform == "log10" else values

    def inverse_transform(self, values: ArrayLike) -> ArrayLike:
        """Transformed units back to physical units."""
        return _exp10(values) if self.transform == "log10" else values

    def normalize(self, values: ArrayLike) -> ArrayLike:
        """Physical values to standardised model targets."""
        return (self.forward_transform(values) - self.mean) / self.std

    def denormalize(self, values: ArrayLike) -> ArrayLike:
        """Standardised model outputs to transformed units (e.g. log10 GPa; eV/atom when not transformed)."""
        return values * self.std + self.mean

    def to_physical(self, values: ArrayLike) -> ArrayLike:
        """Standardised model outputs to physical units (e.g. GPa)."""
        return self.inverse_transform(self.denormalize(values))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        """Inverse of :meth:`as_dict`."""
        return cls(
            float(data["mean"]), float(data["std"]), str(data.get("transform", "identity")), str(data.get("unit", ""))
        )
