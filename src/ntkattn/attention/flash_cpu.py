"""NTK-Attention on CPU from torch's flash-attention kernel and its log-sum-exp.

Per query let S = sum_j e^{s_j} over visible real keys, O the softmax output, N = phi(q)^T Z
and P = max(phi(q)^T k, 0), with N and P in units of e^{c} (c = the feature map's log scale).
The CPU flash kernel returns O and lse = log S, so with any per-row shift m

    out = (a O + b N) / (a + b P),    a = e^{lse - m},  b = e^{c - m}.

We take m = max(lse, c + log P), so a and b are at most 1 and one of them is 1.

Backward. Write alpha = a / (a + b P) and beta = b / (a + b P), so out = alpha O + beta N.
For an upstream gradient G, the score gradient through both O and lse is

    d loss / d s_ij = alpha p_ij (G . v_j - G . out_i).

That is the kernel's own backward for grad_out = G, with `out` replaced by the final output
(the kernel uses `out` only for the row sums D_i = grad_out_i . out_i) and lse replaced by
lse - log alpha (the kernel recomputes p_ij = exp(s_ij - lse_i)). Both facts about the torch
2.13 kernel are checked by the float64 gradcheck tests. So backward saves what plain attention
saves (q, k, v, the returned output, one row of lse) plus beta, and allocates no [B, H, L, d]
tensor of its own before the kernel. The prefix gradients are dN = beta G and
dP = -beta (G . out).

The shift m is held constant in backward: the output does not depend on it except through the
cap on b without k, where the reference implementation holds its shift constant too.

NOTE: the two kernels are private ATen ops (`_scaled_dot_product_flash_attention_for_cpu` and
its backward), used here as they are in torch 2.13.0. `ntk_attention_fast` uses this path only when
`available()` is true; otherwise it falls back to the virtual-key path.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_KERNELS = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FORWARD = getattr(_KERNELS, "default", None)
_BACKWARD = getattr(getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), "default", None)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def available(q: torch.Tensor, attention_mask: torch.Tensor | None, dropout_active: bool) -> bool:
    """Return True when this path can run: CPU tensors, no attention dropout, no mask gradient.

    The CPU flash kernel rejects dropout > 0, and its backward returns no mask gradient.
    """
    if _FORWARD is None or _BACKWARD is None or dropout_active:
        return False
    if q.device.type != "cpu" or q.dtype not in _DTYPES:
        return False
    return attention_mask is None or not attention_mask.requires_grad


def _kernel_mask(attention_mask, dtype):
    """Return (additive mask of q's dtype or None, bool [.., Lq] rows with a visible key or None).

    The kernel returns lse = 0 for a row whose keys are all -inf, which would read as S = 1,
    so those rows are found here and given S = 0.
    """
    if attention_mask is None:
        return None, None
    if attention_mask.dtype == torch.bool:
        rows = attention_mask.any(-1)
        additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return additive.masked_fill_(~attention_mask, float("-inf")), rows
    rows = (attention_mask != float("-inf")).any(-1)
    return attention_mask.to(dtype), rows


def _row_weights(lse, denom_prefix, log_scale, rows, dtype):
    """Return alpha, beta [B, H, Lq] (out = alpha O + beta N) and lse - log alpha for backward.

    Backward passes lse - log alpha = shift + log(a + b P) to the kernel in place of lse, so the
    kernel's recomputed probabilities are alpha p_ij and no scaled copy of the gradient is needed.
    """
    lse = lse.to(dtype)
    if rows is not None:
        lse = torch.where(rows, lse, float("-inf"))
    shift = lse
    if denom_prefix is not None:
        log_p = torch.where(denom_prefix > 0, log_scale + denom_prefix.clamp_min(1e-38).log(), float("-inf"))
        shift = torch.maximum(lse, log_p)
    # A row with no visible key and no prefix mass has shift -inf, and any finite shift gives a = 0.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))

    real_weight = torch.exp(lse - shift)
    # Without k the exact O + N / S overflows when S -> 0; the cap keeps Z = 0 giving O, not NaN.
    prefix_factor = torch.exp(log_scale - shift).clamp_max(torch.finfo(dtype).max)
    denominator = real_weight
    if denom_prefix is not None:
        denominator = denominator + denom_prefix * prefix_factor
    # Rows with denominator 0 see no key (a = 0 needs the prefix term to dominate), so their
    # kernel probabilities are 0 whatever lse the backward gets.
    valid = denominator > 0
    denominator = torch.where(valid, denominator, torch.ones_like(denominator))
    prefix_factor = torch.where(valid, prefix_factor, torch.zeros_like(prefix_factor))
    return real_weight / denominator, prefix_factor / denominator, shift + denominator.log()


class PrefixedFlashAttention(torch.autograd.Function):
    """out = alpha O + beta N from one CPU flash-attention call; see the module doc.

    Inputs: q [B, H, Lq, d], and k and v [B, Hkv, Lk, d] with H a multiple of Hkv. numer N
    [B, H, Lq, d] and denom_prefix P [B, H, Lq] (or None) are in the compute dtype. log_scale
    [B, H, Lq] gets no gradient. mask is an additive mask of q's dtype or None, and rows its
    visible-row flags. Returns [B, H, Lq, d] in q's dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, numer, denom_prefix, log_scale, mask, rows, is_causal, scale):
        dtype = numer.dtype
        out, lse = _FORWARD(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)  # [B, H, Lq, d], [B, H, Lq]
        alpha, beta, backward_lse = _row_weights(lse, denom_prefix, log_scale, rows, dtype)

        # The kernel output is ours, so the combination can run in place on it (float32/64).
        combined = out if out.dtype == dtype else out.to(dtype)
        combined.mul_(alpha.unsqueeze(-1)).addcmul_(numer, beta.unsqueeze(-1))
        result = combined.to(q.dtype)

        ctx.save_for_backward(q, k, v, result, backward_lse.to(lse.dtype), beta, mask)
        ctx.is_causal, ctx.scale, ctx.dtype = is_causal, scale, dtype
        ctx.has_prefix_mass = denom_prefix is not None
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, result, backward_lse, beta, mask = ctx.saved_tensors
        grad_q, grad_k, grad_v = _BACKWARD(
            grad.to(q.dtype), q, k, v, result, backward_lse, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale,
        )

        grad = grad.to(ctx.dtype)
        grad_numer = grad_denom = None
        if ctx.needs_input_grad[4] and ctx.has_prefix_mass:
            grad_denom = -beta * torch.linalg.vecdot(grad, result.to(ctx.dtype))  # [B, H, Lq]
        if ctx.needs_input_grad[3]:
            grad_numer = grad * beta.unsqueeze(-1)
        return grad_q, grad_k, grad_v, grad_numer, grad_denom, None, None, None, None, None


def prefixed_flash_attention(q, k, v, numer, denom_prefix, log_scale, attention_mask, is_causal, scale):
    """Run `PrefixedFlashAttention` after turning the mask into the kernel's additive form."""
    mask, rows = _kernel_mask(attention_mask, q.dtype)
    return PrefixedFlashAttention.apply(q, k, v, numer, denom_prefix, log_scale, mask, rows, is_causal, scale)
