"""Save and load NTK adapters as one safetensors file.

The file holds every NTK parameter and persistent buffer (the random-feature projection
included) under its qualified module name, plus optional extra trainable parameters (e.g. a
classification head). The header metadata stores the NTKConfig as JSON, the injected module
names with their head geometry, and the extra parameter patterns, so a reload reproduces
outputs bit for bit and a mismatched model is rejected before any tensor is copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .attention.params import NTKConfig
from .inject import find_ntk_modules, inject_ntk, name_matches

ADAPTER_FORMAT = "ntkattn-adapter"
ADAPTER_FORMAT_VERSION = "1"


def _adapter_state(model: nn.Module, extra_trainable: Iterable[str]) -> dict[str, torch.Tensor]:
    """Return the tensors an adapter file stores, keyed by qualified name."""
    state = {}
    for name, module in find_ntk_modules(model):
        state.update(module.state_dict(prefix=f"{name}."))
    for pattern in extra_trainable:
        matched = {name: p for name, p in model.named_parameters() if name_matches(name, pattern)}
        if not matched:
            raise ValueError(f"extra_trainable pattern {pattern!r} matches no parameter of {type(model).__name__}")
        state.update(matched)
    return state


def _module_table(model: nn.Module) -> list[dict]:
    return [{"name": name, "heads": module.num_heads, "head_dim": module.head_dim}
            for name, module in find_ntk_modules(model)]


def save_adapter(model: nn.Module, path: str | os.PathLike, extra_trainable: Iterable[str] = ()) -> Path:
    """Write the model's NTK tensors (and parameters matching extra_trainable) to `path`.

    Returns the path written. The file is written to a temporary name and renamed, so an
    interrupted save never leaves a partial adapter at `path`.
    """
    modules = find_ntk_modules(model)
    if not modules:
        raise ValueError("model has no NTK params; call inject_ntk before save_adapter")
    extra_trainable = tuple(extra_trainable)
    cfg = modules[0][1].cfg
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in _adapter_state(model, extra_trainable).items()}
    metadata = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "ntk_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "ntk_modules": json.dumps(_module_table(model)),
        "extra_trainable": json.dumps(list(extra_trainable)),
    }

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def read_adapter(path: str | os.PathLike) -> tuple[NTKConfig, dict, dict[str, torch.Tensor]]:
    """Read an adapter file; returns (config, metadata, tensors) or raises ValueError if invalid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"failed to read adapter file {path} (truncated or not safetensors?): {error}") from error

    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an NTK adapter: metadata format is {metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if metadata.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{path} has adapter format version {metadata.get('format_version')!r}, expected {ADAPTER_FORMAT_VERSION!r}")
    try:
        cfg = NTKConfig.from_dict(json.loads(metadata["ntk_config"]))
        metadata = {**metadata, "ntk_modules": json.loads(metadata["ntk_modules"]),
                    "extra_trainable": json.loads(metadata["extra_trainable"])}
    except (KeyError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path} has invalid adapter metadata: {error}") from error
    return cfg, metadata, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter into `model`, injecting NTK params first if the model has none.

    Raises ValueError when the file is corrupt, its config differs from the model's injected
    config, or its module names or tensor shapes do not match the model. Returns the model.
    """
    cfg, metadata, tensors = read_adapter(path)
    extra_trainable = tuple(metadata["extra_trainable"])
    modules = find_ntk_modules(model)
    if not modules:
        inject_ntk(model, cfg, extra_trainable=extra_trainable)
    elif modules[0][1].cfg != cfg:
        raise ValueError(f"adapter config {cfg} differs from the model's injected config {modules[0][1].cfg}")

    if _module_table(model) != metadata["ntk_modules"]:
        raise ValueError(
            f"adapter {path} was saved for attention modules {metadata['ntk_modules']}, "
            f"but this model has {_module_table(model)}"
        )
    expected = _adapter_state(model, extra_trainable)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    mismatched = [f"{name}: file {tuple(tensors[name].shape)} vs model {tuple(target.shape)}"
                  for name, target in expected.items() if tensors[name].shape != target.shape]
    if mismatched:
        raise ValueError(f"adapter {path} has tensor shapes that do not match the model: {mismatched[:5]}")

    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name].to(dtype=target.dtype))
    return model
