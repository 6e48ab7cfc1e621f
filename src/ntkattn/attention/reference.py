"""Reference NTK-Attention: the formula with materialised scores, for tests and small inputs.

For one query q with visible real keys j and NTK tensors (Z, k) of its head:

    out(q) = ( sum_j e^{s_j} v_j + phi(q)^T Z ) / ( sum_j e^{s_j} + max(phi(q)^T k, 0) )

with s_j = scale * q.k_j. Every term is shifted by the row maximum m = max(max_j s_j, log P)
taken after masking, so no logit overflows or underflows. With `k_ntk=None` (the "no k"
ablation) the denominator keeps only the real-token sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .feature_maps import FeatureMap

ZTensors = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype the NTK terms are computed in: float32 for 16-bit inputs."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def dense_z(z: ZTensors) -> torch.Tensor:
    """Return Z as one [H, r, d] tensor from either a full tensor or a (z_a, z_b) pair."""
    if isinstance(z, torch.Tensor):
        return z
    z_a, z_b = z
    return z_a @ z_b  # [H, r, s] @ [H, s, d]


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q, k, v are [B, H, Lq, d], [B, Hkv, Lk, d], [B, Hkv, Lk, d]."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, L, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def _visible_and_bias(attention_mask, is_causal, lq, lk, device):
    """Return (bool visibility or None, additive float bias or None) for a [.., Lq, Lk] mask."""
    if attention_mask is not None and is_causal:
        raise ValueError("pass either attention_mask or is_causal=True, not both")
    if is_causal:
        # Top-left alignment, as torch.nn.functional.scaled_dot_product_attention uses.
        return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(), None
    if attention_mask is None:
        return None, None
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    return None, attention_mask


def ntk_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    z: ZTensors,
    k_ntk: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    phi_dropout=None,
) -> torch.Tensor:
    """Compute NTK-Attention directly from the formula; returns [B, H, Lq, d] in q's dtype.

    q: [B, H, Lq, d]; k, v: [B, Hkv, Lk, d] with H a multiple of Hkv (grouped-query attention,
    query head h reads key/value head h // (H // Hkv)). z: Z [H, r, d] or (z_a [H, r, s],
    z_b [H, s, d]); k_ntk: [H, r] or None. attention_mask: bool (True = visible) or additive
    float, broadcastable to [B, H, Lq, Lk]. Attention dropout (training only) drops real-token
    weights; the prefix term is not dropped. phi_dropout, when given, is applied to phi(q).
    """
    check_shapes(q, k, v)
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    dtype = compute_dtype(q.dtype)
    scale = head_dim**-0.5 if scale is None else scale
    groups = heads // k.shape[1]

    qc = q.to(dtype)
    kc = k.to(dtype).repeat_interleave(groups, dim=1)  # [B, H, Lk, d]
    vc = v.to(dtype).repeat_interleave(groups, dim=1)
    scores = (qc @ kc.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]

    visible, bias = _visible_and_bias(attention_mask, is_causal, lq, lk, q.device)
    if bias is not None:
        scores = scores + bias.to(dtype)
    if visible is None:
        visible = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)

    # Prefix terms: N = phi(q)^T Z and P = max(phi(q)^T k, 0), both in units of exp(log_scale).
    phi, log_scale = feature_map.scaled_features(qc)  # [B, H, Lq, r]
    if phi_dropout is not None:
        phi = phi_dropout(phi)
    if log_scale is None:
        log_scale = torch.zeros(phi.shape[:-1], dtype=dtype, device=q.device)
    numer_prefix = phi @ dense_z(z).to(dtype)  # [B, H, Lq, d]
    denom_prefix = None
    if k_ntk is not None:
        denom_prefix = (phi * k_ntk.to(dtype)[None, :, None, :]).sum(-1).clamp_min(0.0)  # [B, H, Lq]

    # Row shift after masking, so a large masked logit cannot wipe out the visible ones.
    with torch.no_grad():
        row_max = scores.masked_fill(~visible, float("-inf")).amax(dim=-1)
        shift = row_max
        if denom_prefix is not None:
            log_p = torch.where(denom_prefix > 0, log_scale + denom_prefix.log(), float("-inf"))
            shift = torch.maximum(row_max, log_p)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))

    weights = torch.exp(scores - shift.unsqueeze(-1)).masked_fill(~visible, 0.0)
    # Capped like the fast path: without k, N / S can overflow, and Z = 0 must still give O.
    prefix_factor = torch.exp(log_scale - shift).clamp_max(torch.finfo(dtype).max)  # [B, H, Lq]
    denom = weights.sum(-1)
    if denom_prefix is not None:
        denom = denom + denom_prefix * prefix_factor
    valid = denom > 0
    denom = torch.where(valid, denom, torch.ones_like(denom))

    probs = weights / denom.unsqueeze(-1)
    if training and dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = probs @ vc + numer_prefix * (prefix_factor / denom).unsqueeze(-1)
    out = torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out))
    return out.to(q.dtype)
