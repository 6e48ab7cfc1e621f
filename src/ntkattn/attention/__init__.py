"""NTK-Attention kernels, feature maps and per-layer parameters."""

from .fast import ntk_attention_fast
from .feature_maps import EluFeatureMap, FeatureMap, RandomFeatureMap, TaylorFeatureMap, build_feature_map
from .params import NTKConfig, NTKParams
from .reference import ntk_attention_reference

__all__ = [
    "EluFeatureMap",
    "FeatureMap",
    "NTKConfig",
    "NTKParams",
    "RandomFeatureMap",
    "TaylorFeatureMap",
    "build_feature_map",
    "ntk_attention_fast",
    "ntk_attention_reference",
]
