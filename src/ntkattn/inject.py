"""Inject NTK-Attention into Hugging Face transformers models through the attention interface.

transformers (5.x) attention modules compute q, k, v (after RoPE and the KV-cache update) and
call `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)(module, q, k, v,
mask, dropout=..., scaling=..., **kwargs)`. `inject_ntk` attaches an `NTKParams` child named
`ntk` to every supported self-attention module and switches the model to the attention
implementation "ntk", registered here together with the sdpa mask builder. The function runs
NTK-Attention for modules that carry `ntk` and the model's own sdpa for all others, so
projections, RoPE, KV cache and output projections stay the model's own.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention.params import NTKConfig, NTKParams

ATTN_IMPLEMENTATION = "ntk"
NTK_CHILD_NAME = "ntk"


def ntk_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention-interface function: NTK-Attention for modules with `ntk`, sdpa otherwise.

    q [B, H, Lq, d], k/v [B, Hkv, Lk, d]; returns ([B, Lq, H, d], None) like the sdpa function.
    The causal decision copies transformers' sdpa integration: is_causal is used only with
    more than one query and no mask.
    """
    params = getattr(module, NTK_CHILD_NAME, None)
    if not isinstance(params, NTKParams):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    for unsupported in ("position_bias", "softcap"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"NTK attention does not support {unsupported!r}; use a model without it")

    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        # Prefill into an empty static cache: the keys past q_len are empty slots.
        key, value = key[:, :, :q_len], value[:, :, :q_len]

    out = params.attention(query, key, value, attention_mask=attention_mask, is_causal=is_causal,
                           scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, ntk_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def attention_geometry(module: nn.Module) -> tuple[int, int] | None:
    """Return (query heads, head dim) of a supported self-attention module, else None.

    Supported: modules that call the attention interface with their own q projection
    (`q_proj` or `query`) and expose `scaling`, a head dim and a head count, as LlamaAttention,
    BertSelfAttention and ViTAttention do in transformers 5.25. Cross-attention is skipped.
    """
    if "CrossAttention" in type(module).__name__ or isinstance(module, NTKParams):
        return None
    if not hasattr(module, "scaling") or not (hasattr(module, "q_proj") or hasattr(module, "query")):
        return None
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
    if heads is None and hasattr(module, "config"):
        heads = getattr(module.config, "num_attention_heads", None)
    if not head_dim or not heads:
        return None
    return int(heads), int(head_dim)


def inject_ntk(
    model: nn.Module, cfg: NTKConfig, freeze_base: bool = True, extra_trainable: Iterable[str] = ()
) -> nn.Module:
    """Attach NTK params to every supported attention module and switch to the "ntk" interface.

    Returns the same model. With freeze_base, only NTK params and the parameters named by
    extra_trainable (see `mark_only_ntk_trainable`) keep requires_grad. NTK params are float32
    on the device of each attention module.
    """
    if not isinstance(cfg, NTKConfig):
        raise TypeError(f"cfg must be an NTKConfig, got {type(cfg).__name__}")
    if find_ntk_modules(model):
        raise ValueError("model already has NTK params; inject_ntk must be called once per model")

    targets = [(name, module, geometry) for name, module in model.named_modules()
               if (geometry := attention_geometry(module)) is not None]
    if not targets:
        raise ValueError(f"no supported self-attention module found in {type(model).__name__}")
    for index, (_, module, (heads, head_dim)) in enumerate(targets):
        device = next(module.parameters()).device
        module.add_module(NTK_CHILD_NAME, NTKParams(cfg, heads, head_dim, layer_seed=index).to(device))

    _set_attn_implementation(model)
    if freeze_base:
        mark_only_ntk_trainable(model, extra_trainable)
    return model


def _set_attn_implementation(model: nn.Module) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            config._attn_implementation_internal = ATTN_IMPLEMENTATION


def find_ntk_modules(model: nn.Module) -> list[tuple[str, NTKParams]]:
    """Return (qualified name, NTKParams) for every injected module, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, NTKParams)]


def ntk_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Return (qualified name, parameter) for every NTK parameter of the model."""
    named = []
    for name, module in find_ntk_modules(model):
        named.extend(module.named_parameters(prefix=name))
    return named


def ntk_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the NTK parameters of the model (for an optimizer)."""
    return [parameter for _, parameter in ntk_named_parameters(model)]


def count_ntk_parameters(model: nn.Module) -> int:
    """Return the number of NTK parameters: per head r*s + s*d (+ r with k) low rank, r*d (+ r) full."""
    return sum(parameter.numel() for parameter in ntk_parameters(model))


def name_matches(name: str, pattern: str) -> bool:
    """Return True when a dotted parameter name contains `pattern` as a whole dotted segment run."""
    return f".{pattern}." in f".{name}."


def mark_only_ntk_trainable(model: nn.Module, extra_trainable: Iterable[str] = ()) -> nn.Module:
    """Set requires_grad on NTK params and on parameters whose dotted name contains one of
    extra_trainable as whole segments (e.g. "score" or "classifier"); freeze all others."""
    patterns = tuple(extra_trainable)
    ntk_ids = {id(parameter) for parameter in ntk_parameters(model)}
    if not ntk_ids:
        raise ValueError("model has no NTK params; call inject_ntk first")
    for name, parameter in model.named_parameters():
        keep = id(parameter) in ntk_ids or any(name_matches(name, pattern) for pattern in patterns)
        parameter.requires_grad_(keep)
    return model
