"""Task plug-in `image_classification`: a ViT backbone with a fresh linear head, scored by accuracy.

The base model folder contains the backbone only (ViTModel). `load_image_classifier` adds a head of
`num_labels` outputs (from the data folder's meta.json) whose initial weights depend only on the
seed, so the frozen run scores the same head in training and in evaluation. Every method trains the
head (`classifier`, see methods.TASK_HEAD_NAMES). Images are resized and normalised at batch time
with the base model's image processor, saved in the data folder by prepare-data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ntkattn.study.tasks import DataError, _load_split

EVAL_BATCH_SIZE = 32


def read_num_labels(data_dir: Path, cfg: Mapping[str, Any]) -> int:
    """Return tasks.<name>.num_labels when set, else the count in the data folder's meta.json."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path} not found; rerun the prepare_data stage")
    found = json.loads(meta_path.read_text()).get("num_labels")
    expected = cfg.get("num_labels")
    if expected is not None and found is not None and expected != found:
        raise DataError(f"tasks num_labels = {expected}, but the prepared data has {found} classes; fix num_labels")
    if (expected or found) is None:
        raise DataError(f"{meta_path} has no num_labels; set num_labels under the task in params.yaml")
    return int(expected or found)


def load_image_classifier(model_dir: Path, dtype: str, data_dir: Path, cfg: Mapping[str, Any], seed: int):
    """Return (ViTForImageClassification, image processor) for a ViT base model folder."""
    import transformers

    from ntkattn.study.base_model import read_base_model_meta

    meta = read_base_model_meta(model_dir)
    if not meta["architecture"].startswith("ViT"):
        raise DataError(f"task kind image_classification needs a ViT base model; {model_dir} contains {meta['architecture']}")
    torch.manual_seed(seed)  # the head's initial weights
    model = transformers.ViTForImageClassification.from_pretrained(
        model_dir, num_labels=read_num_labels(data_dir, cfg), dtype=getattr(torch, dtype),
        use_safetensors=True, local_files_only=True)
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    return model, processor


class ImageClassificationTask:
    """Single-label image classification; loss is cross-entropy, score is test accuracy."""

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, data_dir: Path, cfg: Mapping[str, Any]):
        import transformers

        self.cfg = cfg
        folder = Path(data_dir) / "processor"
        if not folder.is_dir():
            raise DataError(f"{folder} not found; rerun the prepare_data stage (it saves the image processor)")
        self.processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.num_labels = read_num_labels(data_dir, cfg)
        self.splits = {split: _load_split(Path(data_dir), split) for split in ("train", "validation", "test")}

    def pixels(self, images) -> torch.Tensor:
        return self.processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]  # [B, 3, H, W]

    def train_batch(self, gen: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        table = self.splits["train"]
        rows = torch.randint(0, len(table), (batch_size,), generator=gen).tolist()
        picked = table.select(rows)
        return {"pixel_values": self.pixels(picked["image"]), "labels": torch.tensor(picked["label"])}

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits  # [B, num_labels]
        return F.cross_entropy(logits.float(), batch["labels"].to(logits.device))

    def score(self, model: nn.Module, split: str, progress: bool = False) -> dict[str, Any]:
        table = self.splits[split]
        if split == "validation" and self.cfg.get("max_val_examples"):
            table = table.select(range(min(len(table), self.cfg["max_val_examples"])))
        device = next(model.parameters()).device
        correct, was_training = 0, model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(table), EVAL_BATCH_SIZE):
                chunk = table.select(range(start, min(start + EVAL_BATCH_SIZE, len(table))))
                logits = model(pixel_values=self.pixels(chunk["image"]).to(device)).logits
                correct += int((logits.argmax(-1).cpu() == torch.tensor(chunk["label"])).sum())
        model.train(was_training)
        accuracy = correct / len(table)
        return {"accuracy": accuracy, "n": len(table), "value": accuracy}
