"""Losses of the training loop."""

from __future__ import annotations

import torch


def masked_mse_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labels that exist (``targets`` NaN where a crystal has no label).

    Both (B, T) in normalised units. The mean runs over all present (crystal, target) pairs; a batch with no
    label at all gives a zero that still depends on ``predictions`` (so ``backward`` works).
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
    present = ~torch.isnan(targets)
    count = present.sum()
    squared = torch.where(present, predictions - torch.nan_to_num(targets), torch.zeros_like(predictions)) ** 2
    return squared.sum() / count.clamp_min(1)
