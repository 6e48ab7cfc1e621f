"""Task plug-ins: how a task draws training batches, computes its loss and scores a split.

Batches are a pure function of (seed, step, process index), so a resumed run draws exactly the
batches an uninterrupted run would have drawn, and data-parallel processes draw different ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ntkattn.study import metrics


class DataError(RuntimeError):
    """Prepared data is missing, empty or does not match the task."""


def _load_split(data_dir: Path, split: str):
    import datasets

    folder = data_dir / split
    if not folder.is_dir():
        raise DataError(f"{folder} not found; run the prepare_data stage (dvc repro prepare_data@{data_dir.name})")
    if _has_no_shards(folder):
        raise DataError(f"{folder} has no examples; check the task's sizes in params.yaml")
    try:
        table = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises several types for damaged folders
        raise DataError(f"{folder} cannot be read ({exc}); delete it and rerun the prepare_data stage") from None
    if len(table) == 0:
        raise DataError(f"{folder} has no examples; check the task's sizes in params.yaml")
    return table


def _has_no_shards(folder: Path) -> bool:
    # datasets 5.2 saves an empty table with no arrow shard, and load_from_disk then fails with an
    # IndexError; state.json lists the shards.
    try:
        return json.loads((folder / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def batch_generator(seed: int, step: int, process: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + step) * 257 + process)
    return gen


class CausalLMTask:
    """Next-token prediction on a token stream; scored by perplexity (lower is better)."""

    metric = "perplexity"
    higher_is_better = False

    def __init__(self, data_dir: Path, cfg: Mapping[str, Any]):
        self.cfg = cfg
        self.streams = {}
        for split in ("train", "validation", "test"):
            table = _load_split(data_dir, split)
            ids = [tok for row in table["input_ids"] for tok in row]
            self.streams[split] = torch.tensor(ids, dtype=torch.long)
        if self.streams["train"].numel() <= cfg["block_size"] + 1:
            raise DataError(f"train split has {self.streams['train'].numel()} tokens, fewer than block_size + 1")

    def train_batch(self, gen: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        stream, block = self.streams["train"], self.cfg["block_size"]
        starts = torch.randint(0, stream.numel() - block, (batch_size,), generator=gen)
        input_ids = torch.stack([stream[s : s + block] for s in starts.tolist()])  # [B, block]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return metrics.lm_loss(logits, batch["input_ids"])

    def score(self, model: nn.Module, split: str, progress: bool = False) -> dict[str, Any]:
        limit = self.cfg["max_val_tokens"] if split == "validation" else self.cfg["max_eval_tokens"]
        stream = self.streams[split][: limit + 1]
        out = metrics.perplexity(
            model, stream, self.cfg["eval_context"], self.cfg["eval_stride"], batch_size=4, progress=progress
        )
        out["value"] = out["perplexity"]
        out.update(context=self.cfg["eval_context"], stride=self.cfg["eval_stride"])
        return out


class YesNoTask:
    """Passage-grounded yes/no questions read through two verbalizer tokens; scored by accuracy."""

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, data_dir: Path, cfg: Mapping[str, Any], pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id
        meta_path = data_dir / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{meta_path} not found; rerun the prepare_data stage")
        verbalizer = json.loads(meta_path.read_text())["verbalizer"]
        self.verbalizer = {"no": verbalizer["no"]["id"], "yes": verbalizer["yes"]["id"]}
        self.splits = {split: _load_split(data_dir, split) for split in ("train", "validation", "test")}

    def train_batch(self, gen: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        table = self.splits["train"]
        rows = torch.randint(0, len(table), (batch_size,), generator=gen).tolist()
        picked = table.select(rows)
        input_ids, attention_mask = metrics.pad_batch(picked["input_ids"], self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(picked["label"])}

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = metrics.last_token_logits(logits, batch["attention_mask"])  # [B, V]
        return metrics.yes_no_loss(last, batch["labels"], self.verbalizer)

    def score(self, model: nn.Module, split: str, progress: bool = False) -> dict[str, Any]:
        table = self.splits[split]
        if split == "validation":
            table = table.select(range(min(len(table), self.cfg["max_val_examples"])))
        out = metrics.yes_no_accuracy(
            model, table["input_ids"], table["label"], self.verbalizer, batch_size=8, pad_id=self.pad_id
        )
        out["value"] = out["accuracy"]
        return out


def read_meta(data_dir: Path, kind: str) -> dict:
    """Read a prepared data folder's meta.json and check that it holds data of task kind `kind`."""
    meta_path = data_dir / "meta.json"
    # prepare_data writes meta.json last, inside a staging folder, so a folder without it is incomplete.
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: {data_dir} is not a complete data folder; rerun the prepare_data stage")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path} cannot be read ({exc}); rerun the prepare_data stage") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise DataError(f"{data_dir} holds data of kind {found!r}, but the task's kind is {kind!r}; pass the task's own data folder")
    return meta


def build_task(kind: str, data_dir: str | Path, cfg: Mapping[str, Any], pad_id: int):
    data_dir = Path(data_dir)
    if kind in ("causal_lm", "yes_no"):
        read_meta(data_dir, kind)
    if kind == "causal_lm":
        return CausalLMTask(data_dir, cfg)
    if kind == "yes_no":
        return YesNoTask(data_dir, cfg, pad_id)
    if kind == "image_classification":
        from ntkattn.study.tasks_vision import ImageClassificationTask

        return ImageClassificationTask(data_dir, cfg)
    if kind == "math":
        from ntkattn.study.tasks_math import MathTask

        return MathTask(data_dir, cfg)
    raise DataError(f"task kind {kind!r} has no training plug-in yet; known kinds: causal_lm, yes_no, "
                    "image_classification, math")


def load_task_model(model_dir: str | Path, dtype: str, cfg: Mapping[str, Any], data_dir: str | Path, seed: int):
    """Load the base model in the form the task kind trains: (model, tokenizer or image processor).

    Image classification adds a seeded classifier head to the ViT backbone; other kinds load the
    saved architecture as it is.
    """
    from ntkattn.study.base_model import load_base_model

    if cfg["kind"] == "image_classification":
        from ntkattn.study.tasks_vision import load_image_classifier

        return load_image_classifier(Path(model_dir), dtype, Path(data_dir), cfg, seed)
    return load_base_model(model_dir, dtype)


def pad_token_id(tokenizer) -> int | None:
    """Return the pad id of a tokenizer (EOS when it has none); None for an image processor."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
