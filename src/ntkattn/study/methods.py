"""Fine-tuning methods as plug-ins of the one training loop.

A method turns a loaded base model into the model that trains (`apply`), writes the smallest
checkpoint that rebuilds it (`save`), and rebuilds it from the base model and that checkpoint
(`load`). Parameter-efficient methods save adapters only; full fine-tuning saves every weight.
Every method trains the same task head: none for the causal-LM tasks here (the yes/no task reads
the LM head's verbalizer logits, which stay frozen for every parameter-efficient method), and the
classifier head for classification models (trainable for every method alike).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

# Parameter-name fragments of task heads that every method trains on classification models.
TASK_HEAD_NAMES = ("classifier", "score")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, truncated or made for another model or method."""


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of task-head parameters (trained by every method when the model has a head)."""
    return [n for n, _ in model.named_parameters() if any(part in n.split(".") for part in TASK_HEAD_NAMES)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _unfreeze_heads(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        parts = name.split(".")
        # PEFT keeps a frozen copy of a wrapped head as `original_module`; only the live copy trains.
        if any(part in parts for part in TASK_HEAD_NAMES) and "original_module" not in parts:
            param.requires_grad_(True)


def _save_heads(model: nn.Module, out_dir: Path) -> None:
    from safetensors.torch import save_file

    heads = {n: p.detach().contiguous() for n, p in model.named_parameters() if n in head_parameter_names(model)}
    if heads:
        save_file(heads, str(out_dir / "task_head.safetensors"))


def _load_heads(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    path = ckpt / "task_head.safetensors"
    if not path.exists():
        return
    state = load_file(str(path))
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        # PEFT wrappers prefix names with base_model.model.; match on the suffix.
        target = params.get(name)
        if target is None:
            target = next((p for n, p in params.items() if n.endswith("." + name)), None)
        if target is None or target.shape != tensor.shape:
            raise CheckpointError(f"{path}: head tensor {name!r} does not fit this model")
        with torch.no_grad():
            target.copy_(tensor)


# --- frozen -----------------------------------------------------------------------------------


def _frozen_apply(model: nn.Module, cfg: Mapping[str, Any], seed: int) -> nn.Module:
    model.requires_grad_(False)
    return model


def _frozen_save(model: nn.Module, out_dir: Path) -> None:
    (out_dir / "frozen.json").write_text(json.dumps({"note": "base model, no trained weights"}))


def _frozen_load(model: nn.Module, ckpt: Path, cfg: Mapping[str, Any]) -> nn.Module:
    return model


# --- full fine-tuning -------------------------------------------------------------------------


def _full_apply(model: nn.Module, cfg: Mapping[str, Any], seed: int) -> nn.Module:
    model.requires_grad_(True)
    return model


def _full_save(model: nn.Module, out_dir: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(out_dir / "model.safetensors"))


def _full_load(model: nn.Module, ckpt: Path, cfg: Mapping[str, Any]) -> nn.Module:
    from safetensors.torch import load_model

    try:
        load_model(model, str(ckpt / "model.safetensors"), strict=True)
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise CheckpointError(f"{ckpt / 'model.safetensors'} cannot be loaded: {exc}") from None
    return model


# --- LoRA and prefix tuning through PEFT ------------------------------------------------------


def _peft_task_type(model: nn.Module):
    from peft import TaskType

    return TaskType.SEQ_CLS if head_parameter_names(model) else TaskType.CAUSAL_LM


def _lora_apply(model: nn.Module, cfg: Mapping[str, Any], seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["alpha"],
        lora_dropout=cfg["dropout"],
        target_modules=list(cfg["target_modules"]),
        task_type=_peft_task_type(model),
    )
    model = get_peft_model(model, config)
    _unfreeze_heads(model)
    return model


def _prefix_apply(model: nn.Module, cfg: Mapping[str, Any], seed: int) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    # prefix_projection=False trains the per-layer key/value rows directly: P-Tuning v2.
    config = PrefixTuningConfig(
        num_virtual_tokens=cfg["num_virtual_tokens"], prefix_projection=False, task_type=_peft_task_type(model)
    )
    model = get_peft_model(model, config)
    _unfreeze_heads(model)
    return model


def _peft_save(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _save_heads(model, out_dir)


def _peft_load(model: nn.Module, ckpt: Path, cfg: Mapping[str, Any]) -> nn.Module:
    from peft import PeftModel

    if not (ckpt / "adapter_model.safetensors").exists():
        raise CheckpointError(f"{ckpt} has no adapter_model.safetensors; rerun the training stage")
    try:
        model = PeftModel.from_pretrained(model, str(ckpt))
    except Exception as exc:  # PEFT surfaces truncated files as several exception types
        raise CheckpointError(f"adapter in {ckpt} cannot be loaded: {exc}") from None
    _load_heads(model, ckpt)
    return model


# --- NTK-Attention ----------------------------------------------------------------------------


def _ntk_config(cfg: Mapping[str, Any], seed: int):
    from ntkattn import NTKConfig

    return NTKConfig(
        feature_map=cfg["feature_map"],
        r=cfg["r"],
        s=cfg["s"],
        z_rank=cfg["z_rank"],
        use_k=cfg["use_k"],
        dropout=cfg["dropout"],
        init_std=cfg["init_std"],
        impl=cfg["impl"],
        seed=seed,
    )


def _ntk_apply(model: nn.Module, cfg: Mapping[str, Any], seed: int) -> nn.Module:
    from ntkattn import inject_ntk, mark_only_ntk_trainable

    model = inject_ntk(model, _ntk_config(cfg, seed))
    mark_only_ntk_trainable(model, extra_trainable=TASK_HEAD_NAMES)
    return model


def _ntk_save(model: nn.Module, out_dir: Path) -> None:
    from ntkattn import save_adapter

    save_adapter(model, str(out_dir / "ntk_adapter.safetensors"))
    _save_heads(model, out_dir)


def _ntk_load(model: nn.Module, ckpt: Path, cfg: Mapping[str, Any]) -> nn.Module:
    from ntkattn import load_adapter

    path = ckpt / "ntk_adapter.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path} not found; rerun the training stage")
    model = load_adapter(model, str(path))
    _load_heads(model, ckpt)
    return model


class Method:
    """One registry entry: how to build, save and reload a fine-tuned model."""

    def __init__(self, name: str, apply: Callable, save: Callable, load: Callable, trains: bool = True):
        self.name, self.apply, self._save, self.load, self.trains = name, apply, save, load, trains

    def save(self, model: nn.Module, out_dir: str | os.PathLike) -> None:
        """Write the checkpoint to a temporary folder, then swap it in, so none is ever half-written."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._save(model, tmp)
        (tmp / "method.json").write_text(json.dumps({"method": self.name}))
        old = out_dir.with_name(out_dir.name + ".old")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)

    def restore(self, model: nn.Module, ckpt: str | os.PathLike, cfg: Mapping[str, Any]) -> nn.Module:
        ckpt = Path(ckpt)
        marker = ckpt / "method.json"
        if not marker.exists():
            missing = "no method.json" if ckpt.is_dir() else "the folder does not exist"
            raise CheckpointError(
                f"{ckpt} is not a complete checkpoint ({missing}); rerun the training stage, for example "
                "`dvc repro --force --single-item train@<task>-<run>-<seed>`"
            )
        saved = json.loads(marker.read_text()).get("method")
        if saved != self.name:
            raise CheckpointError(f"{ckpt} holds a {saved!r} checkpoint, expected {self.name!r}")
        return self.load(model, ckpt, cfg)


METHODS: dict[str, Method] = {
    "frozen": Method("frozen", _frozen_apply, _frozen_save, _frozen_load, trains=False),
    "full": Method("full", _full_apply, _full_save, _full_load),
    "lora": Method("lora", _lora_apply, _peft_save, _peft_load),
    "prefix": Method("prefix", _prefix_apply, _peft_save, _peft_load),
    "ntk": Method("ntk", _ntk_apply, _ntk_save, _ntk_load),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
