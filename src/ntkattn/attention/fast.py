"""Fast NTK-Attention: one fused scaled_dot_product_attention call plus O(L) work.

Two forms. On CPU without attention dropout the prefix terms are combined with the output and
log-sum-exp of torch's CPU flash kernel (flash_cpu.py), at head dim d and with no widened
copies. Other devices and attention dropout use the virtual-key form derived here.

Derivation. Per query, let S = sum_j e^{s_j} over visible real keys, O the softmax output,
N = phi(q)^T Z and P = max(phi(q)^T k, 0). The target is out = (S O + N) / (S + P).

We add one virtual key that every query sees, with a per-query logit log V for any V > 0, and
widen the values by two columns: real values get (v, 1, 0), the virtual value is (0, 0, 1).
The kernel normalises by T = S + V and returns

    real = S O / T,    u = S / T,    w = V / T,

so 1 / T = w / V and out = (real + N w / V) / (u + P w / V). The output does not depend on V,
so V only sets the conditioning: we take V = e^{a} + P with a = the query's score against its
own key (visible to every causal or bidirectional row), which keeps u and w away from underflow.
With k removed, P = 0 and out = (real + N w / V) / u. Because V is arbitrary, it is computed
without gradient, and the gradients of q, k, v, Z and k through this form are exact.

The per-query logit is fed through the query: q gets two extra coordinates (hi, lo) holding
log V / scale split into two numbers of q's dtype (lo is 0 in float32), and the virtual key is
(0, ..., 0, 1, 1). Real keys get zeros there. The weight V the kernel actually uses is
recomputed from the rounded (hi, lo), so 16-bit inputs do not bias the prefix weight.

Masks: without an explicit mask and with is_causal=True, one dummy query row is prepended
together with the virtual key at position 0, so the kernel's own top-left causal mask stays
correct and no mask is built. With an explicit mask (padding, or a KV cache where Lq != Lk) the
mask gets one always-visible column in front; bool masks stay bool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import flash_cpu
from .feature_maps import FeatureMap
from .prefix_terms import numerator_prefix, prefix_terms  # noqa: F401 (numerator_prefix: import path kept for callers)
from .reference import ZTensors, check_shapes, compute_dtype


@torch.no_grad()
def _own_key_scores(q, k, top_left, scale, dtype):
    """Return each query's scaled score against its own key, [B, H, Lq].

    The own key is key i for top-left causal masks and key i + Lk - Lq otherwise (a KV cache
    puts the new tokens last), clamped into range.
    """
    lq, lk = q.shape[2], k.shape[2]
    index = torch.arange(lq, device=q.device)
    if not top_left:
        index = index + (lk - lq)
    index = index.clamp(0, lk - 1)
    own = k[:, :, index].repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B, H, Lq, d]
    return (q.to(dtype) * own.to(dtype)).sum(-1) * scale


@torch.no_grad()
def _virtual_logit(own, denom_prefix, log_scale, scale, out_dtype):
    """Pick log V = log(e^{own} + P) and split it into (hi, lo) coordinates of q's dtype.

    Returns (hi, lo, shift, weight) where weight = V e^{-shift} is the virtual weight the
    kernel will actually apply, recomputed from the rounded coordinates.
    """
    shift = own
    weight = torch.ones_like(own)
    if denom_prefix is not None:
        log_p = torch.where(denom_prefix > 0, log_scale + denom_prefix.clamp_min(1e-38).log(), float("-inf"))
        shift = torch.maximum(own, log_p)
        weight = torch.exp(own - shift) + denom_prefix * torch.exp(log_scale - shift)
    coordinate = (shift + weight.log()) / scale
    hi = coordinate.to(out_dtype)
    lo = (coordinate - hi.to(coordinate.dtype)).to(out_dtype)
    used_logit = (hi.to(coordinate.dtype) + lo.to(coordinate.dtype)) * scale
    return hi, lo, shift, torch.exp(used_logit - shift)


class _Embed(torch.autograd.Function):
    """Copy x [B, H, L, d] into rows first_row.. and columns :d of a fresh buffer.

    A custom function so that backward returns a view of the incoming gradient instead of the
    full-size clones that autograd makes for a chain of slice assignments.
    """

    @staticmethod
    def forward(ctx, x, buffer, first_row):
        ctx.first_row, ctx.rows, ctx.width = first_row, x.shape[2], x.shape[3]
        buffer[:, :, first_row : first_row + x.shape[2], : x.shape[3]] = x
        ctx.mark_dirty(buffer)
        return buffer

    @staticmethod
    def backward(ctx, grad):
        return grad[:, :, ctx.first_row : ctx.first_row + ctx.rows, : ctx.width], None, None


def _augment(q, k, v, hi, lo, dummy_row):
    """Build q [B, H, Lq(+1), d+2], k and v [B, Hkv, Lk+1, d+2] with the virtual key first."""
    batch, heads, lq, head_dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    first = 1 if dummy_row else 0

    q_buffer = q.new_zeros(batch, heads, lq + first, head_dim + 2)
    q_buffer[:, :, first:, head_dim] = hi
    q_buffer[:, :, first:, head_dim + 1] = lo

    k_buffer = k.new_zeros(batch, kv_heads, lk + 1, head_dim + 2)
    k_buffer[:, :, 0, head_dim:] = 1.0

    v_buffer = v.new_zeros(batch, kv_heads, lk + 1, head_dim + 2)
    v_buffer[:, :, 1:, head_dim] = 1.0
    v_buffer[:, :, 0, head_dim + 1] = 1.0
    return _Embed.apply(q, q_buffer, first), _Embed.apply(k, k_buffer, 1), _Embed.apply(v, v_buffer, 1)


def _augment_mask(attention_mask, dtype):
    """Prepend one always-visible column (the virtual key) to a bool or additive mask."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        column = torch.ones(*attention_mask.shape[:-1], 1, dtype=torch.bool, device=attention_mask.device)
        return torch.cat([column, attention_mask], dim=-1)
    attention_mask = attention_mask.to(dtype)
    column = torch.zeros(*attention_mask.shape[:-1], 1, dtype=dtype, device=attention_mask.device)
    return torch.cat([column, attention_mask], dim=-1)


def ntk_attention_fast(
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
    """Compute NTK-Attention with one fused attention call; same contract as the reference.

    On CPU without attention dropout this runs `flash_cpu.PrefixedFlashAttention` (flash kernel
    plus log-sum-exp, no widened copies). Elsewhere it runs the virtual-key form below, at head
    dim d + 2.
    """
    check_shapes(q, k, v)
    if attention_mask is not None and is_causal:
        raise ValueError("pass either attention_mask or is_causal=True, not both")
    dtype = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    # Prefix terms in units of exp(log_scale): N [B, H, Lq, d] and P [B, H, Lq].
    numer, denom_prefix, log_scale = prefix_terms(q, feature_map, z, k_ntk, phi_dropout, dtype)

    dropout_active = training and dropout_p > 0
    if flash_cpu.available(q, attention_mask, dropout_active):
        return flash_cpu.prefixed_flash_attention(
            q, k, v, numer, denom_prefix, log_scale, attention_mask, is_causal, scale,
        )
    return _virtual_key_attention(
        q, k, v, numer, denom_prefix, log_scale, attention_mask, is_causal, scale, dropout_p, dropout_active,
    )


def _virtual_key_attention(q, k, v, numer, denom_prefix, log_scale, attention_mask, is_causal, scale,
                           dropout_p, dropout_active):
    """Combine the prefix terms with one fused attention call over a virtual key (module doc).

    NOTE: with attention dropout active a second kernel call without dropout supplies the
    undropped normaliser, so that step costs two attention calls.
    """
    head_dim = q.shape[-1]
    dtype = numer.dtype
    dummy_row = is_causal and attention_mask is None
    own = _own_key_scores(q, k, dummy_row, scale, dtype)
    hi, lo, shift, virtual_weight = _virtual_logit(own, denom_prefix, log_scale, scale, q.dtype)
    q_aug, k_aug, v_aug = _augment(q, k, v, hi, lo, dummy_row)
    mask_aug = _augment_mask(attention_mask, q.dtype)

    def kernel(p):
        return F.scaled_dot_product_attention(
            q_aug, k_aug, v_aug, attn_mask=mask_aug, dropout_p=p, is_causal=dummy_row,
            scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )[:, :, 1 if dummy_row else 0 :]  # [B, H, Lq, d+2]

    out_aug = kernel(dropout_p if dropout_active else 0.0)
    stats = kernel(0.0)[..., head_dim:] if dropout_active else out_aug[..., head_dim:]
    real = out_aug[..., :head_dim].to(dtype)  # S O / T
    real_mass, virtual_mass = stats[..., 0].to(dtype), stats[..., 1].to(dtype)  # S / T, V / T

    # 1/T in units of exp(shift): w / V. Prefix terms rescaled to the same units.
    # NOTE: without k the exact output O + N / S overflows when every visible logit is far below
    # the feature scale (S -> 0). The factor is capped at the dtype's max so that Z = 0 still
    # gives O instead of 0 * inf = NaN.
    inv_total = virtual_mass / virtual_weight
    prefix_factor = torch.exp(log_scale - shift).clamp_max(torch.finfo(dtype).max) * inv_total  # [B, H, Lq]
    denominator = real_mass
    if denom_prefix is not None:
        denominator = denominator + denom_prefix * prefix_factor
    # A row with no visible key and no prefix mass has real = 0; zeroing its prefix factor
    # makes its output 0 without a full-size where.
    valid = denominator > 0
    denominator = torch.where(valid, denominator, torch.ones_like(denominator))
    prefix_factor = torch.where(valid, prefix_factor, torch.zeros_like(prefix_factor))
    out = torch.addcmul(real, numer, prefix_factor.unsqueeze(-1)) / denominator.unsqueeze(-1)
    return out.to(q.dtype)
