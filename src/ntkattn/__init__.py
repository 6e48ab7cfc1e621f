"""NTK-Attention: an infinitely long trainable prefix folded into a kernel feature map.

Names are imported on first use, so `import ntkattn.attention` does not pull in transformers.
"""

from importlib import import_module

_EXPORTS = {
    "NTKConfig": "ntkattn.attention.params",
    "NTKParams": "ntkattn.attention.params",
    "ntk_attention_fast": "ntkattn.attention.fast",
    "ntk_attention_reference": "ntkattn.attention.reference",
    "ATTN_IMPLEMENTATION": "ntkattn.inject",
    "count_ntk_parameters": "ntkattn.inject",
    "inject_ntk": "ntkattn.inject",
    "mark_only_ntk_trainable": "ntkattn.inject",
    "ntk_parameters": "ntkattn.inject",
    "load_adapter": "ntkattn.adapter",
    "save_adapter": "ntkattn.adapter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ntkattn' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
