"""Prefix terms of NTK-Attention: N = phi(q) Z and P = max(phi(q) k, 0), recomputed in backward.

Under autograd, `prefix_terms` saves only its inputs (q, which the attention kernel saves
anyway, and the small Z and k tensors) and recomputes phi(q) in backward. So no [B, H, Lq, r]
tensor is kept between forward and backward, at the price of one more feature map evaluation.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .feature_maps import FeatureMap
from .reference import ZTensors


def numerator_prefix(phi: torch.Tensor, z: ZTensors, dtype: torch.dtype) -> torch.Tensor:
    """Return phi @ Z as [B, H, Lq, d] without forming Z for a low-rank pair.

    The second product is split into two halves (plus one odd column) computed by separate
    matmuls of equal shape, so the antisymmetric initialisation (second half = first half with
    z_b negated) gives exactly 0 instead of a fused multiply-add rounding residue.
    """
    if isinstance(z, torch.Tensor):
        return phi @ z.to(dtype)
    z_a, z_b = z[0].to(dtype), z[1].to(dtype)  # [H, r, s], [H, s, d]
    reduced = phi @ z_a  # [B, H, Lq, s]; equal columns of z_a give equal columns here
    half = z_a.shape[-1] // 2
    if half == 0:
        return reduced @ z_b
    # In-place sums: bmm saves its inputs, not its output, so this drops one [B, H, Lq, d] buffer.
    out = reduced[..., :half] @ z_b[:, :half]
    out.add_(reduced[..., half : 2 * half] @ z_b[:, half : 2 * half])
    if z_a.shape[-1] % 2:
        out.add_(reduced[..., 2 * half :] @ z_b[:, 2 * half :])
    return out


def _compute_prefix_terms(q, feature_map, z, k_ntk, phi_dropout, dtype):
    """Return N = phi(q) Z [B, H, Lq, d], P = max(phi(q) k, 0) [B, H, Lq] or None, log_scale."""
    phi, log_scale = feature_map.scaled_features(q.to(dtype))
    if phi_dropout is not None:
        phi = phi_dropout(phi)
    if log_scale is None:
        log_scale = torch.zeros(phi.shape[:-1], dtype=dtype, device=q.device)
    numer = numerator_prefix(phi, z, dtype)
    denom_prefix = None
    if k_ntk is not None:
        denom_prefix = (phi @ k_ntk.to(dtype).unsqueeze(-1)).squeeze(-1).clamp_min(0.0)  # no [.., r] product
    return numer, denom_prefix, log_scale


class _RecomputedPrefixTerms(torch.autograd.Function):
    """Run `_compute_prefix_terms` without saving its intermediates; recompute phi in backward.

    Inputs after `layout` are q and the flattened Z and k tensors. log_scale is returned without
    gradient, as every feature map detaches it. Backward is written out (no nested autograd
    call), so it allocates only phi, its gradient and parameter-sized tensors.
    """

    @staticmethod
    def forward(ctx, layout, q, *tensors):
        ctx.layout = layout
        ctx.set_materialize_grads(False)  # an unused output gets None, not a zero-filled buffer
        ctx.save_for_backward(q, *tensors)
        numer, denom_prefix, log_scale = _compute_prefix_terms(q, *layout.unflatten(tensors))
        ctx.mark_non_differentiable(log_scale)
        return numer, denom_prefix, log_scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_numer, grad_denom, _grad_log_scale):
        q, *tensors = ctx.saved_tensors
        feature_map, z, k_ntk, _, dtype = ctx.layout.unflatten(tensors)
        x = q.to(dtype)
        phi, _ = feature_map.scaled_features(x)  # [B, H, Lq, r]

        grad_phi, grad_z = None, [None] * (len(tensors) - (k_ntk is not None))
        if grad_numer is not None:
            grad_phi, grad_z = _numerator_backward(phi, z, grad_numer.to(dtype))
        grad_k = None
        if k_ntk is not None and grad_denom is not None:
            k_column = k_ntk.to(dtype).unsqueeze(-1)  # [H, r, 1]
            # clamp_min(0) passes the gradient where phi.k >= 0, as torch's clamp_min does.
            grad_p = torch.where((phi @ k_column).squeeze(-1) >= 0, grad_denom.to(dtype), 0.0)  # [B, H, Lq]
            grad_k = (grad_p.unsqueeze(-2) @ phi).sum(0).squeeze(-2).to(k_ntk.dtype)  # [H, r]
            k_row = k_column.transpose(-1, -2)  # [H, 1, r]
            if grad_phi is None:
                grad_phi = grad_p.unsqueeze(-1) * k_row
            else:
                grad_phi.addcmul_(grad_p.unsqueeze(-1), k_row)

        grad_q = None
        if grad_phi is not None and ctx.needs_input_grad[1]:
            grad_q = feature_map.scaled_features_backward(x, phi, grad_phi).to(q.dtype)
        grads = [*grad_z, grad_k] if k_ntk is not None else list(grad_z)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])]
        return (None, grad_q, *grads)


def _numerator_backward(phi, z, grad_numer):
    """Return d loss / d phi and the gradients of the Z tensors for N = phi Z, summed over batch."""
    dtype = grad_numer.dtype
    if isinstance(z, torch.Tensor):
        grad_z = (phi.transpose(-1, -2) @ grad_numer).sum(0)  # [H, r, d]
        return grad_numer @ z.to(dtype).transpose(-1, -2), [grad_z.to(z.dtype)]
    z_a, z_b = z[0].to(dtype), z[1].to(dtype)  # [H, r, s], [H, s, d]
    reduced = phi @ z_a  # [B, H, Lq, s]
    grad_reduced = grad_numer @ z_b.transpose(-1, -2)  # [B, H, Lq, s]
    grad_z_a = (phi.transpose(-1, -2) @ grad_reduced).sum(0)
    grad_z_b = (reduced.transpose(-1, -2) @ grad_numer).sum(0)
    return grad_reduced @ z_a.transpose(-1, -2), [grad_z_a.to(z[0].dtype), grad_z_b.to(z[1].dtype)]


class _Layout:
    """Rebuild (feature_map, z, k_ntk, phi_dropout, dtype) from the flattened Z and k tensors."""

    def __init__(self, feature_map, z_is_pair, has_k, dtype):
        self.feature_map, self.z_is_pair, self.has_k, self.dtype = feature_map, z_is_pair, has_k, dtype

    def unflatten(self, tensors):
        z = tuple(tensors[:2]) if self.z_is_pair else tensors[0]
        k_ntk = tensors[-1] if self.has_k else None
        return self.feature_map, z, k_ntk, None, self.dtype


def prefix_terms(q, feature_map: FeatureMap, z: ZTensors, k_ntk, phi_dropout, dtype):
    """Return N [B, H, Lq, d], P [B, H, Lq] or None, and log_scale [B, H, Lq], all in `dtype`.

    Recomputes in backward unless phi dropout is active, whose random mask would need replaying.
    """
    dropout_active = phi_dropout is not None and phi_dropout.training and phi_dropout.p > 0
    if dropout_active or not torch.is_grad_enabled():
        return _compute_prefix_terms(q, feature_map, z, k_ntk, phi_dropout, dtype)

    z_is_pair = not isinstance(z, torch.Tensor)
    tensors = (*z,) if z_is_pair else (z,)
    if k_ntk is not None:
        tensors = (*tensors, k_ntk)
    layout = _Layout(feature_map, z_is_pair, k_ntk is not None, dtype)
    return _RecomputedPrefixTerms.apply(layout, q, *tensors)
