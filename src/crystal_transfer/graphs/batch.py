"""The batch of crystal graphs that every model consumes (the contract between graphs and models).

Atoms of all crystals in a batch are stacked; neighbour slots are padded to ``M = max_num_nbr``.
Gaussian edge features are not here: models expand ``nbr_dist`` themselves, on their device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class GraphBatch:
    """A batch of crystal graphs.

    Attributes:
        numbers: (N,) long, atomic number of every atom in the batch.
        nbr_idx: (N, M) long, batch-global index of each neighbour slot's atom (padded slots: see nbr_mask).
        nbr_dist: (N, M) float32, neighbour distances in Å.
        nbr_mask: (N, M) bool, True for a real neighbour. With CGCNN compatibility padding the padded slots
            point at the crystal's atom 0 at distance radius + 1 and are marked True, as the original code
            treats them.
        crystal: (N,) long, index of each atom's crystal in the batch (0 .. num_crystals - 1).
        num_crystals: number of crystals B.
        targets: (B, T) float32, labels in the order of the dataset's targets, NaN where missing.
        ids: crystal ids, length B.
        atom_fea: optional (N, F) cached atom features after the first ``atom_fea_depth`` convolutions of a
            frozen trunk; a model then runs only its later layers (see crystal_transfer.experiments.frozen_features).
        atom_fea_depth: the depth ``atom_fea`` was taken at.
    """

    numbers: torch.Tensor
    nbr_idx: torch.Tensor
    nbr_dist: torch.Tensor
    nbr_mask: torch.Tensor
    crystal: torch.Tensor
    num_crystals: int
    targets: torch.Tensor
    ids: list[str] = field(default_factory=list)
    atom_fea: torch.Tensor | None = None
    atom_fea_depth: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GraphBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            moved[item.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return GraphBatch(**moved)
