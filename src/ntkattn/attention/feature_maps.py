"""Feature maps phi: R^d -> R^r whose inner products stand in for exp(q.p / sqrt(d)).

Every map returns its features in a scaled form, `(phi_scaled, log_scale)` with
`phi = phi_scaled * exp(log_scale[..., None])`, so that maps with a large dynamic range (random
features) can be combined with attention logits in log space. `log_scale` is None for maps that
need no shift (elu, taylor).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_MAPS = ("elu", "taylor", "random")


class FeatureMap(nn.Module):
    """Base class of the feature maps. Subclasses implement `scaled_features`, and `forward`
    returns the plain features phi(x)."""

    def __init__(self, head_dim: int, width: int):
        super().__init__()
        self.head_dim = head_dim
        self.width = width

    def scaled_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def scaled_features_backward(self, x: torch.Tensor, phi: torch.Tensor, grad_phi: torch.Tensor) -> torch.Tensor:
        """Return d loss / d x from grad_phi = d loss / d phi_scaled, with log_scale held constant.

        phi is `scaled_features(x)[0]`. Subclasses give closed forms that may overwrite phi and
        grad_phi; this default differentiates `scaled_features` with autograd.
        """
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            (grad_x,) = torch.autograd.grad((self.scaled_features(x)[0] * grad_phi).sum(), x)
        return grad_x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi, log_scale = self.scaled_features(x)
        if log_scale is None:
            return phi
        return phi * torch.exp(log_scale).unsqueeze(-1)


class _EluPlusOne(torch.autograd.Function):
    """phi = elu(x * input_scale) + 1, saving only phi for backward.

    d phi / dx = input_scale * min(phi, 1): for x > 0 phi = x' + 1 > 1 and the slope is 1, and
    for x <= 0 phi = e^{x'} is its own slope. Saving phi, which the prefix products keep anyway,
    instead of elu's input saves one [..., d] tensor per layer.
    """

    @staticmethod
    def forward(ctx, x, input_scale):
        phi = F.elu(x * input_scale).add_(1.0)
        ctx.save_for_backward(phi)
        ctx.input_scale = input_scale
        return phi

    @staticmethod
    def backward(ctx, grad):
        (phi,) = ctx.saved_tensors
        return grad * phi.clamp_max(1.0).mul_(ctx.input_scale), None


class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x / d^(1/4)) + 1, elementwise and positive, so r = d."""

    def __init__(self, head_dim: int):
        super().__init__(head_dim, head_dim)

    def scaled_features(self, x):
        return _EluPlusOne.apply(x, self.head_dim**-0.25), None

    def scaled_features_backward(self, x, phi, grad_phi):
        return grad_phi.mul_(phi.clamp_max_(1.0)).mul_(self.head_dim**-0.25)


class TaylorFeatureMap(FeatureMap):
    """phi(x) = [1, x / d^(1/4)], so phi(q).phi(p) = 1 + q.p / sqrt(d), the first-order Taylor
    expansion of exp(q.p / sqrt(d)); r = d + 1.

    NOTE: these features can be negative, so phi(q).k can be negative. Both attention
    implementations clamp P = phi(q).k at 0 (the gradient still passes at exactly 0), while the
    numerator phi(q)^T Z is used unclamped.
    """

    def __init__(self, head_dim: int):
        super().__init__(head_dim, head_dim + 1)

    def scaled_features(self, x):
        ones = torch.ones_like(x[..., :1])
        return torch.cat([ones, x * self.head_dim**-0.25], dim=-1), None

    def scaled_features_backward(self, x, phi, grad_phi):
        return grad_phi[..., 1:] * self.head_dim**-0.25


class RandomFeatureMap(FeatureMap):
    """Positive random features (Performer FAVOR+): E[phi(q).phi(p)] = exp(q.p / sqrt(d)).

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(r) with x' = x / d^(1/4) and rows of W drawn from
    N(0, I_d) by a generator seeded with `seed`. W is a persistent buffer, so a saved adapter
    reloads the same features. The per-row shift `log_scale = max_r(W x' - |x'|^2 / 2)` keeps
    `phi_scaled` in (0, 1/sqrt(r)]. The shift is detached: every consumer rebuilds phi from
    (phi_scaled, log_scale) exactly, so the shift has no effect on values or gradients.
    """

    def __init__(self, head_dim: int, width: int, seed: int):
        super().__init__(head_dim, width)
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(width, head_dim, generator=generator)  # [r, d]
        self.register_buffer("projection", projection, persistent=True)

    def scaled_features(self, x):
        x = x * self.head_dim**-0.25
        projection = self.projection.to(dtype=x.dtype)
        logits = x @ projection.T - 0.5 * x.pow(2).sum(-1, keepdim=True)  # [..., r]
        log_scale = logits.detach().amax(dim=-1)
        phi = torch.exp(logits - log_scale.unsqueeze(-1)) / math.sqrt(self.width)
        return phi, log_scale

    def scaled_features_backward(self, x, phi, grad_phi):
        # d phi / d logits = phi; d logits / d x' = W - x' (one row per feature).
        input_scale = self.head_dim**-0.25
        grad_logits = grad_phi.mul_(phi)  # [..., r]
        grad_scaled = grad_logits @ self.projection.to(dtype=x.dtype)
        grad_scaled.sub_(x * input_scale * grad_logits.sum(-1, keepdim=True))
        return grad_scaled.mul_(input_scale)


def natural_width(feature_map: str, head_dim: int) -> int:
    """Return the feature width r a map has when the config leaves r unset."""
    if feature_map == "taylor":
        return head_dim + 1
    return head_dim


def build_feature_map(feature_map: str, head_dim: int, width: int, seed: int) -> FeatureMap:
    """Build the feature map named in an `NTKConfig` for one attention module."""
    if feature_map == "elu":
        return EluFeatureMap(head_dim)
    if feature_map == "taylor":
        return TaylorFeatureMap(head_dim)
    if feature_map == "random":
        return RandomFeatureMap(head_dim, width, seed)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
