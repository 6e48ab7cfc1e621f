"""Image data sets that work offline: Fashion-MNIST (Debian package) and the CIFAR-10 test set
shipped in BIG-bench.

  fashion-mnist     60k/10k 28x28 grey images in IDX format under /usr/share/datasets/fashion-mnist/
                    (apt-get install dataset-fashion-mnist); validation is held out of the 60k
  bigbench-cifar10  the 10,000 CIFAR-10 test images (base64 PNG) of BIG-bench
                    cifar10_classification/base64, split into train/validation/test by n_*

Both write the image_classification columns: image (datasets.Image, RGB), label.
"""

from __future__ import annotations

import ast
import base64
import gzip
import io
import random
from pathlib import Path

import numpy as np

from ntkattn.study import data_plugins
from ntkattn.study.assets import AssetMissingError
from ntkattn.study.data_plugins import DatasetEntry

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
CIFAR10_TASK = "cifar10_classification/base64"
SPLIT_SEED = 0


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file into a uint8 array: images [N, 28, 28] or labels [N]."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header shape {shape}, {data.size} bytes of data")
    return data.reshape(shape)


def read_fashion_mnist(split: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images [N, 28, 28] uint8, labels [N] uint8) of split 'train' (60k) or 't10k' (10k)."""
    folder = Path(folder or FASHION_MNIST_DIR)
    images, labels = folder / f"{split}-images-idx3-ubyte.gz", folder / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise AssetMissingError(f"Fashion-MNIST files {images.name} / {labels.name} not found in {folder}. "
                                f"Install them with: {FASHION_MNIST_INSTALL}")
    return read_idx(images), read_idx(labels)


def _grey_to_rgb(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(image, mode="L").convert("RGB") for image in images]


def prepare_fashion_mnist(task_cfg, model_folder: Path):
    """Validation held out of the 60k training images; test is the published 10k test set."""
    from ntkattn.study.data_hub import image_features

    train_x, train_y = read_fashion_mnist("train")
    test_x, test_y = read_fashion_mnist("t10k")
    sizes = data_plugins.split_sizes(task_cfg, defaults={"train": len(train_y) - 5000, "validation": 5000, "test": len(test_y)})
    order = list(range(len(train_y)))
    random.Random(SPLIT_SEED).shuffle(order)
    picks = {
        "validation": order[: sizes["validation"]],
        "train": order[sizes["validation"]: sizes["validation"] + sizes["train"]],
    }
    columns = {name: {"image": _grey_to_rgb(train_x[idx]), "label": train_y[idx].astype(int).tolist()}
               for name, idx in picks.items()}
    n_test = min(sizes["test"], len(test_y))
    columns["test"] = {"image": _grey_to_rgb(test_x[:n_test]), "label": test_y[:n_test].astype(int).tolist()}
    meta = {"source": str(FASHION_MNIST_DIR), "label_names": FASHION_MNIST_LABELS, "num_labels": 10}
    return columns, image_features(), meta


def read_bigbench_cifar10() -> tuple[list[bytes], list[int], list[str]]:
    """Return (PNG bytes, labels, label names) of the 10,000 CIFAR-10 test images in BIG-bench."""
    from ntkattn.study import assets

    task = assets.read_bigbench_task(CIFAR10_TASK)
    pngs, labels, names = [], [], None
    for example in task["examples"]:
        # target_scores is a Python dict literal in a string: {'airplane': 1, 'automobile': 0, ...}
        scores = ast.literal_eval(example["target_scores"]) if isinstance(example["target_scores"], str) else example["target_scores"]
        names = names or list(scores)
        labels.append(max(range(len(names)), key=lambda i: scores[names[i]]))
        pngs.append(base64.b64decode(example["input"]))
    return pngs, labels, names


def prepare_bigbench_cifar10(task_cfg, model_folder: Path):
    """Split the BIG-bench CIFAR-10 images (the CIFAR-10 test set) into train/validation/test."""
    from PIL import Image

    from ntkattn.study.data_hub import image_features

    pngs, labels, names = read_bigbench_cifar10()
    sizes = data_plugins.split_sizes(task_cfg, defaults={"train": 7000, "validation": 1000, "test": 2000})
    if sum(sizes.values()) > len(pngs):
        raise ValueError(f"n_train + n_validation + n_test = {sum(sizes.values())} exceeds the {len(pngs)} "
                         "CIFAR-10 images in BIG-bench; lower them")
    order = list(range(len(pngs)))
    random.Random(SPLIT_SEED).shuffle(order)
    cuts, columns, start = {}, {}, 0
    for name in ("test", "validation", "train"):
        cuts[name] = order[start: start + sizes[name]]
        start += sizes[name]
    for name, idx in cuts.items():
        columns[name] = {"image": [Image.open(io.BytesIO(pngs[i])).convert("RGB") for i in idx],
                         "label": [labels[i] for i in idx]}
    meta = {"source": f"BIG-bench {CIFAR10_TASK} (the CIFAR-10 test set)", "label_names": names, "num_labels": len(names)}
    return columns, image_features(), meta


DATASETS = {
    "fashion-mnist": DatasetEntry("image_classification", prepare_fashion_mnist, "Fashion-MNIST, Debian dataset-fashion-mnist"),
    "bigbench-cifar10": DatasetEntry("image_classification", prepare_bigbench_cifar10,
                                     "CIFAR-10 test set from BIG-bench, split three ways"),
}
