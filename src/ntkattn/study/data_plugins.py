"""Registry of the data sets that live outside data.py: hub data sets, images and math problems.

Each entry maps a `tasks.<name>.dataset` value to its task kind and a preparer
`prepare(task_cfg, model_folder) -> (splits, datasets.Features, meta)`, where each split is a
column mapping or a ready `datasets.Dataset`. data.py looks
names up here before its own table, and `write_splits` writes the result the same way data.py
does: train/, validation/, test/ as `datasets` folders plus meta.json, replaced atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SPLITS = ("train", "validation", "test")
# The training and evaluation code of these kinds reads the base model's preprocessor from the data
# folder: images need its resize and normalisation, math needs its tokenizer to encode and decode text.
PREPROCESSOR_DIR = {"image_classification": "processor", "math": "tokenizer"}


@dataclass(frozen=True)
class DatasetEntry:
    kind: str
    prepare: Callable[[Any, Path], tuple[dict, Any, dict]]
    description: str


def registered() -> dict[str, DatasetEntry]:
    """Return every data set of the plug-in modules, by name."""
    from ntkattn.study import data_hub, data_vision

    return {**data_hub.DATASETS, **data_vision.DATASETS}


def split_sizes(task_cfg, defaults: dict[str, int] | None = None) -> dict[str, int]:
    """Return {split: n} from the task's n_train / n_validation / n_test (a missing key uses `defaults`)."""
    sizes = {}
    for name in SPLITS:
        value = getattr(task_cfg, f"n_{name}", None)
        if value is None and defaults is not None:
            value = defaults.get(name)
        if value is None:
            raise ValueError(f"task needs n_{name} (number of {name} examples); add it under the task in params.yaml")
        sizes[name] = int(value)
    return sizes


def write_splits(task_name: str, task_cfg, model_folder: Path, out: Path) -> dict:
    """Prepare a registered data set and write it to `out`; return the meta written to meta.json."""
    from datasets import Dataset, DatasetDict

    from ntkattn.study import assets

    start = time.perf_counter()
    entry = registered()[task_cfg.dataset]
    columns, features, extra = entry.prepare(task_cfg, Path(model_folder))
    meta = {
        "task": task_name,
        "kind": entry.kind,
        "dataset": task_cfg.dataset,
        "description": entry.description,
        "examples": {name: _length(columns[name]) for name in SPLITS},
        # Token counts of text kinds; data sets without an input_ids column (images, math text) have none.
        "tokens": {name: _token_count(columns[name]) for name in SPLITS},
        **extra,
    }
    with assets.staged_output(Path(out)) as staging:
        splits = DatasetDict({name: _as_dataset(columns[name], features, Dataset) for name in SPLITS})
        splits.save_to_disk(str(staging))
        _save_preprocessor(entry.kind, Path(model_folder), staging)
        meta["seconds"] = round(time.perf_counter() - start, 1)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _length(split) -> int:
    return len(split) if not isinstance(split, dict) else len(next(iter(split.values())))


def _as_dataset(split, features, dataset_class):
    if isinstance(split, dict):
        return dataset_class.from_dict(split, features=features)
    return split


def _save_preprocessor(kind: str, model_folder: Path, staging: Path) -> None:
    import transformers

    folder = PREPROCESSOR_DIR.get(kind)
    if folder is None:
        return
    if kind == "image_classification":
        processor = transformers.AutoImageProcessor.from_pretrained(model_folder, local_files_only=True)
    else:
        processor = transformers.AutoTokenizer.from_pretrained(model_folder, local_files_only=True)
    processor.save_pretrained(staging / folder)


def _token_count(split) -> int | None:
    if isinstance(split, dict) and "input_ids" in split:
        return sum(map(len, split["input_ids"]))
    return None
