"""The edge part of CGCNN's gated convolution, one autograd function per backend.

Σ_j σ(f_ij) ⊙ softplus(c_ij) with [f, c] = BatchNorm(z), z = self_part_i + nbr_part_j + u_ij W_eᵀ, for batches
whose neighbour slots are all real. ``torch``: :class:`TorchGatedMessages`, PyTorch operations with a
hand-written backward (any device and dtype). ``compiled``: :class:`CompiledGatedMessages`, the same
computation with its elementwise loops in the C library of :mod:`crystal_transfer.kernels.native` (float32 on
the CPU). :class:`crystal_transfer.models.layers.ConvLayer` picks one by its ``backend``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crystal_transfer.kernels import native


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


class TorchGatedMessages(torch.autograd.Function):
    """Σ_j σ(f_ij) ⊙ softplus(c_ij) with [f, c] = BatchNorm(z), z = self_part_i + nbr_part_j + u_ij W_eᵀ.

    The edge part of CGCNN's gated convolution for the case where every neighbour slot is real, as one
    autograd node with a hand-written backward: the (N·M, 2a) edge tensor is read and written fewer times
    than by the chain of eager modules (no ``cat`` of the two halves' gradients, BatchNorm folded into
    per-channel scale and shift, the edge matmul accumulated into the gathered sum by ``addmm_``).
    ``training`` selects batch statistics (and updates ``running_mean`` / ``running_var`` like
    ``nn.BatchNorm1d``) or the running statistics. tests/models/test_cgcnn.py checks values and gradients against
    the eager modules (:meth:`ConvLayer.eager`).
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


class CompiledGatedMessages(torch.autograd.Function):
    """:class:`TorchGatedMessages` with its elementwise passes in compiled C (``crystal_transfer.kernels.native``).

    Same inputs, outputs and BatchNorm semantics (batch statistics, biased for normalising and unbiased for the
    running variance, as ``nn.BatchNorm1d``); float32 CPU tensors only. Gather plus self part, the BatchNorm
    statistics (accumulated in float64), the fused sigmoid · softplus with the neighbour sum, and in the backward
    the gradient of the BatchNorm input with the per-atom sum and the scatter of the neighbour gradient are one C
    loop each; the atom matmuls stay with PyTorch. Given ``band`` (the distances behind the Gaussian edge features,
    :meth:`CGCNN.gaussian_band`), the edge matmul u W_e and its weight gradient run in the gather and the backward
    loops over each edge's band of non-zero Gaussians only (about 19 of CGCNN's 41), instead of PyTorch's dense
    ``addmm_`` and ``mm``. Without gradients (``needs_backward`` False: validation, prediction) nothing is kept for
    a backward. tests/models/test_cgcnn.py compares it with :class:`TorchGatedMessages`.
    """

    @staticmethod
    def forward(ctx, self_part, nbr_part, edge_fea, edge_weight, bn_weight, bn_bias, nbr_idx, bn_state, how):
        # long: one C call per pass, in order, with the buffers each pass hands to the next and to the backward
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
        # long: the backward's C passes in order; their buffers stay local
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
