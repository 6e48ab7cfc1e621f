"""NTK-Attention configuration and the per-layer trainable tensors.

Initialisation (exact identity at step 0, gradient for every tensor on the first backward):

- k = |k_raw| with k_raw = 0, through `_abs_with_unit_slope`, whose derivative is sign(x) with
  sign(0) = +1 instead of 0. So k = 0 (P = phi(q).k = 0) at step 0, yet d k / d k_raw = 1.
  P = 0 is exact in both implementations (no floor), and d out / d P = -out / S is not 0.
- Low-rank Z = z_a z_b: z_a's second half of columns copies its first half and z_b's second
  half of rows is the first half negated, so Z = A B - A B = 0 while both factors get gradient
  (d z_a = G z_b^T = [G B^T, -G B^T], d z_b = z_a^T G = [A^T G; A^T G]). For odd s the last
  column of z_a is random and the last row of z_b is 0. NOTE: with s = 1 no pair exists and
  z_a gets a zero gradient on the first backward (like LoRA's A factor).
- Full-rank Z starts at 0; its gradient phi(q)^T dN is not 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .fast import ntk_attention_fast
from .feature_maps import FEATURE_MAPS, build_feature_map, natural_width
from .reference import ntk_attention_reference

Z_RANKS = ("low", "full")
IMPLEMENTATIONS = ("fast", "reference")


@dataclass(frozen=True)
class NTKConfig:
    """Options of NTK-Attention, validated on construction.

    feature_map: "elu" (r = d), "taylor" (r = d + 1) or "random" (any r).
    r: feature width; None means the map's natural width (d for elu and random, d + 1 for taylor).
    s: rank of Z = z_a z_b for z_rank "low"; must satisfy 1 <= s <= min(r, d).
    z_rank: "low" (z_a [H, r, s], z_b [H, s, d]) or "full" (z [H, r, d]).
    use_k: keep the prefix mass phi(q).k in the denominator; False is the "no k" ablation.
    dropout: probability in [0, 1) applied to phi(q) in training mode only.
    init_std: standard deviation of the random low-rank factor (>= 0).
    seed: seed of the random-feature projection and of the low-rank factor initialisation.
    impl: "fast" (one fused attention call) or "reference" (materialised scores).
    """

    feature_map: str = "elu"
    r: int | None = None
    s: int = 8
    z_rank: str = "low"
    use_k: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    seed: int = 0
    impl: str = "fast"

    def __post_init__(self):
        _check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        _check_choice("z_rank", self.z_rank, Z_RANKS)
        _check_choice("impl", self.impl, IMPLEMENTATIONS)
        if self.r is not None and (not _is_int(self.r) or self.r < 1):
            raise ValueError(f"NTKConfig.r must be a positive int or None, got {self.r!r}")
        if not _is_int(self.s) or self.s < 1:
            raise ValueError(f"NTKConfig.s must be a positive int, got {self.s!r}")
        if not isinstance(self.use_k, bool):
            raise ValueError(f"NTKConfig.use_k must be a bool, got {self.use_k!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"NTKConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.init_std, (int, float)) or not self.init_std >= 0.0:
            raise ValueError(f"NTKConfig.init_std must be a float >= 0, got {self.init_std!r}")
        if not _is_int(self.seed):
            raise ValueError(f"NTKConfig.seed must be an int, got {self.seed!r}")

    def resolve_width(self, head_dim: int) -> int:
        """Return r for a head dimension d, raising ValueError if r or s do not fit d."""
        width = natural_width(self.feature_map, head_dim) if self.r is None else self.r
        if self.feature_map in ("elu", "taylor") and width != natural_width(self.feature_map, head_dim):
            expected = natural_width(self.feature_map, head_dim)
            raise ValueError(
                f"NTKConfig.r={width} is invalid for feature_map={self.feature_map!r} with head_dim={head_dim}: "
                f"this map has r = {expected}; set r={expected} or r=None"
            )
        if self.z_rank == "low" and self.s > min(width, head_dim):
            raise ValueError(
                f"NTKConfig.s={self.s} is out of range for r={width}, head_dim={head_dim}: "
                f"s must be in [1, {min(width, head_dim)}]"
            )
        return width

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NTKConfig":
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown NTKConfig fields: {sorted(unknown)}")
        return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"NTKConfig.{name} must be one of {allowed}, got {value!r}")


def _abs_with_unit_slope(x: torch.Tensor) -> torch.Tensor:
    """Return |x| with derivative sign(x), where sign(0) = +1 (torch.abs has slope 0 at 0)."""
    sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype).detach()
    return x * sign


class NTKParams(nn.Module):
    """Trainable NTK tensors of one attention module, one set per query head.

    Parameters: z_a [H, r, s] and z_b [H, s, d] (low rank) or z [H, r, d] (full rank), and
    k_raw [H, r] when use_k (k = |k_raw|, see `_abs_with_unit_slope`). The feature map (with its
    random projection buffer) and the phi(q) dropout module are children of this module.
    """

    def __init__(self, cfg: NTKConfig, num_heads: int, head_dim: int, layer_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.width = cfg.resolve_width(head_dim)
        self.feature_map = build_feature_map(cfg.feature_map, head_dim, self.width, cfg.seed + layer_seed)
        self.phi_dropout = nn.Dropout(cfg.dropout)

        if cfg.z_rank == "full":
            self.z = nn.Parameter(torch.zeros(num_heads, self.width, head_dim))
        else:
            z_a, z_b = _antisymmetric_factors(num_heads, self.width, cfg.s, head_dim, cfg.init_std, cfg.seed + layer_seed)
            self.z_a = nn.Parameter(z_a)
            self.z_b = nn.Parameter(z_b)
        self.k_raw = nn.Parameter(torch.zeros(num_heads, self.width)) if cfg.use_k else None

    def z_tensors(self):
        """Return Z as a full tensor or a (z_a, z_b) pair, as the attention functions take it."""
        if self.cfg.z_rank == "full":
            return self.z
        return (self.z_a, self.z_b)

    def k_vector(self) -> torch.Tensor | None:
        """Return the non-negative prefix-mass vector k [H, r], or None when use_k is False."""
        if self.k_raw is None:
            return None
        return _abs_with_unit_slope(self.k_raw)

    def attention(self, q, k, v, attention_mask=None, is_causal=False, scale=None, dropout_p=0.0):
        """Run NTK-Attention with this module's tensors; q [B, H, Lq, d], k/v [B, Hkv, Lk, d]."""
        if q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"query shape {tuple(q.shape)} does not match NTK params for {self.num_heads} heads of dim {self.head_dim}"
            )
        function = ntk_attention_fast if self.cfg.impl == "fast" else ntk_attention_reference
        return function(
            q, k, v, self.feature_map, self.z_tensors(), self.k_vector(),
            attention_mask=attention_mask, is_causal=is_causal, scale=scale,
            dropout_p=dropout_p, training=self.training, phi_dropout=self.phi_dropout,
        )

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, r={self.width}, cfg={self.cfg}"


def _antisymmetric_factors(heads, width, rank, head_dim, std, seed):
    """Return (z_a, z_b) with z_a z_b = 0 exactly and both factors non-zero (see module doc)."""
    generator = torch.Generator().manual_seed(seed)
    half = rank // 2
    z_a = torch.randn(heads, width, rank, generator=generator) * std
    z_b = torch.zeros(heads, rank, head_dim)
    if half > 0:
        z_a[..., half : 2 * half] = z_a[..., :half]
        first = torch.randn(heads, half, head_dim, generator=generator) * std
        z_b[:, :half] = first
        z_b[:, half : 2 * half] = -first
    return z_a, z_b
