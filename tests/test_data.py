"""Data preparation on the real gensim Wikipedia dump and Rotten Tomatoes reviews, and on a
BIG-bench archive built here in the layout of the real one, with a small random base model."""

import bz2
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import DatasetDict, load_from_disk

from ntkattn.study import assets, base_model, data

TINY = {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 64}
TAIL_TEXT = "\nIs this review positive? Answer:"


def lm_cfg(**overrides):
    fields = {"kind": "causal_lm", "dataset": "gensim-wiki", "split_fractions": {"validation": 0.1, "test": 0.1}}
    return SimpleNamespace(**{**fields, **overrides})


def qa_cfg(**overrides):
    fields = {"kind": "yes_no", "dataset": "rt-reviews", "n_train": 40, "n_validation": 8, "n_test": 11, "max_length": 48}
    return SimpleNamespace(**{**fields, **overrides})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("model") / "base"
    cfg = SimpleNamespace(source="random-llama", hub_id=None, tokenizer=None, dtype="float32", tiny=TINY)
    base_model.save_base_model(cfg, folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return data.load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def lm_out(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "lm"
    meta = data.prepare_task("lm", lm_cfg(), model_dir, out)
    return out, meta


@pytest.fixture(scope="module")
def qa_out(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "qa"
    meta = data.prepare_task("qa", qa_cfg(), model_dir, out)
    return out, meta


def test_lm_splits_by_article(lm_out):
    out, meta = lm_out
    splits = load_from_disk(str(out))
    titles = {name: set(splits[name]["title"]) for name in data.SPLITS}

    assert meta["articles_in_dump"] == 106
    assert meta["examples"] == {"train": 84, "validation": 11, "test": 11}
    assert not titles["train"] & titles["validation"]
    assert not titles["train"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    assert sum(len(t) for t in titles.values()) == 106


def test_lm_eos_ends_each_article(lm_out, tokenizer):
    out, meta = lm_out
    eos = tokenizer.eos_token_id
    assert meta["eos_token_id"] == eos
    for row in load_from_disk(str(out))["validation"]:
        assert row["input_ids"][-1] == eos
        assert eos not in row["input_ids"][:-1]


def test_lm_meta_token_counts(lm_out):
    out, meta = lm_out
    splits = load_from_disk(str(out))
    written = json.loads((out / "meta.json").read_text())
    assert written == meta
    for name in data.SPLITS:
        assert meta["tokens"][name] == sum(len(ids) for ids in splits[name]["input_ids"])
    assert meta["source_sha256"] == assets.sha256_file(assets.gensim_wiki_dump())
    assert sum(meta["characters"].values()) > 3_000_000


def test_lm_markup_stripped(lm_out, tokenizer):
    out, _ = lm_out
    text = tokenizer.decode(load_from_disk(str(out))["test"][0]["input_ids"])
    assert "[[" not in text
    assert "{{" not in text


def test_lm_max_articles(model_dir, tmp_path):
    meta = data.prepare_task("lm", lm_cfg(max_articles=10), model_dir, tmp_path / "lm")
    assert meta["examples"] == {"train": 8, "validation": 1, "test": 1}


def test_qa_labels_balanced(qa_out):
    out, meta = qa_out
    splits = load_from_disk(str(out))
    assert meta["examples"] == {"train": 40, "validation": 8, "test": 11}
    assert sum(splits["train"]["label"]) == 20
    assert sum(splits["validation"]["label"]) == 4
    assert sum(splits["test"]["label"]) == 6
    assert meta["label_balance"]["train"] == 0.5


def test_qa_question_never_truncated(qa_out, tokenizer):
    out, meta = qa_out
    tail = tokenizer(TAIL_TEXT, add_special_tokens=False)["input_ids"]
    _, trail = data._special_tokens_around(tokenizer)
    at_max_length = 0
    for row in load_from_disk(str(out))["train"]:
        ids = row["input_ids"]
        assert len(ids) <= 48
        assert ids[len(ids) - len(trail) - len(tail): len(ids) - len(trail)] == tail
        at_max_length += len(ids) == 48
    # max_length 48 is short, so some reviews must have been cut, and each cut prompt fills it.
    assert meta["truncated_passages"]["train"] > 0
    assert at_max_length >= meta["truncated_passages"]["train"]


def test_encode_prompt_cuts_passage_only(tokenizer):
    specials = data._special_tokens_around(tokenizer)
    claim = "The tower is taller than 300 metres ."
    source = data.YES_NO_SOURCES["bigbench-vitaminc"]
    ids, truncated = data.encode_prompt(tokenizer, "word " * 200, claim, 40, specials, source)
    tail = tokenizer(source.tail.format(claim=claim), add_special_tokens=False)["input_ids"]

    assert truncated
    assert len(ids) == 40
    assert ids[len(ids) - len(specials[1]) - len(tail): len(ids) - len(specials[1])] == tail
    assert data.encode_prompt(tokenizer, "short", "word " * 100, 40, specials, source) is None


def test_select_balanced_groups_disjoint():
    examples = [(f"passage {i}", f"claim {i % 30}", i % 2, f"claim {i % 30}") for i in range(200)]
    sizes = {"train": 20, "validation": 6, "test": 6}
    seen = []

    # The encoder records each accepted claim; splits are filled in the order test, validation, train.
    columns, _ = data.select_balanced(examples, sizes, lambda evidence, claim: (seen.append(claim) or [0], False))
    for name, rows in columns.items():
        assert len(rows["label"]) == sizes[name]
        assert sum(rows["label"]) == sizes[name] // 2
    test_claims, validation_claims, train_claims = set(seen[:6]), set(seen[6:12]), set(seen[12:])
    assert not test_claims & validation_claims
    assert not train_claims & (test_claims | validation_claims)


def test_qa_verbalizer_ids(qa_out, tokenizer):
    _, meta = qa_out
    assert meta["verbalizer"]["yes"]["id"] == tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    assert meta["verbalizer"]["no"]["id"] != meta["verbalizer"]["yes"]["id"]


def test_verbalizer_rejects_multi_token():
    class SplittingTokenizer:
        name_or_path = "splitting"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(data.DataPrepError, match="' yes' is 4 tokens"):
        data.verbalizer_ids(SplittingTokenizer())


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (lm_cfg(dataset="wikitext"), "dataset 'wikitext' is unknown"),
        (lm_cfg(dataset="bigbench-vitaminc"), "provides kind 'yes_no', but kind is 'causal_lm'"),
        (qa_cfg(dataset="gensim-wiki"), "provides kind 'causal_lm', but kind is 'yes_no'"),
        (lm_cfg(split_fractions={"validation": 0.5, "test": 0.5}, max_articles=4), "leave no training article"),
        (qa_cfg(n_train=None), "needs n_train"),
    ],
)
def test_bad_task_config(cfg, message, model_dir, tmp_path):
    with pytest.raises(data.DataPrepError, match=message):
        data.prepare_task("t", cfg, model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_qa_too_few_examples(model_dir, tmp_path, monkeypatch):
    few = [(f"passage {i}", "", i % 2, f"movie {i}") for i in range(30)]
    monkeypatch.setattr(data, "read_rotten_tomatoes", lambda: (few, {"source_sha256": "sha"}))
    with pytest.raises(data.DataPrepError, match="too few usable examples for n_train=40"):
        data.prepare_task("qa", qa_cfg(), model_dir, tmp_path / "out")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is corrupt"),
        (b"not bz2 at all", "is corrupt"),
        (bz2.compress(b"<mediawiki><page><title>x"), "is corrupt"),
        (bz2.compress(b"<mediawiki><page><title>R</title><redirect/><revision><text>#REDIRECT [[A]]</text></revision></page></mediawiki>"), "contains no articles"),
    ],
)
def test_bad_wiki_dump(content, message, model_dir, tmp_path, monkeypatch):
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(content)
    monkeypatch.setattr(assets, "gensim_wiki_dump", lambda: dump)
    with pytest.raises(data.DataPrepError, match=message):
        data.prepare_task("lm", lm_cfg(), model_dir, tmp_path / "out")


def test_failed_write_leaves_no_output(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "data" / "lm"

    def fail_midway(self, path, **kwargs):
        (Path(path) / "train").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(DatasetDict, "save_to_disk", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        data.prepare_task("lm", lm_cfg(max_articles=10), model_dir, out)
    assert list(out.parent.iterdir()) == []


def test_qa_reviews_split_by_movie(qa_out):
    _, meta = qa_out
    examples, provenance = data.read_rotten_tomatoes()
    assert meta["source_sha256"] == provenance["source_sha256"] == assets.sha256_file(assets.rotten_tomatoes_corpus())
    assert meta["candidates_dedup"] == len(examples) > 12_000
    assert {label for _, _, label, _ in examples} == {0, 1}

    # The real selection on the real corpus: record each accepted review's movie per split.
    movie_of = {text: movie for text, _, _, movie in examples}
    accepted = []
    sizes = {"train": 200, "validation": 50, "test": 50}
    data.select_balanced(examples, sizes, lambda text, claim: (accepted.append(movie_of[text]) or [0], False))
    test, validation, train = set(accepted[:50]), set(accepted[50:100]), set(accepted[100:])
    assert not test & validation
    assert not train & (test | validation)


def vitaminc_example(evidence: str, claim: str, verdict: str) -> dict:
    scores = {"True": 0, "False": 0, "Neither": 0}
    scores[verdict] = 1
    return {"input": f"{evidence}\nClaim: {claim}", "target_scores": scores}


@pytest.fixture()
def bigbench_archive(tmp_path, monkeypatch):
    """A small archive with the real one's layout: a VitaminC task and an arithmetic task."""
    examples = [vitaminc_example(f"Evidence number {i} about a town .", f"The town has {i} people .", ("True", "False")[i % 2])
                for i in range(60)]
    examples.append(vitaminc_example("Neutral evidence .", "A claim with no verdict .", "Neither"))
    examples += [vitaminc_example("Same evidence .", "Contradictory claim .", verdict) for verdict in ("True", "False")]
    members = {
        f"{data.VITAMINC_TASK}/task.json": {"name": "vitaminc_fact_verification", "examples": examples},
        "arithmetic/task.json": {"name": "arithmetic", "examples": []},
    }
    archive = tmp_path / assets.BIGBENCH_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for member, content in members.items():
            raw = json.dumps(content).encode()
            info = tarfile.TarInfo(f"{assets.BIGBENCH_TASKS}/{member}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    monkeypatch.setenv("NTKATTN_ASSETS", str(tmp_path))
    return archive


def test_read_bigbench_task(bigbench_archive):
    task = assets.read_bigbench_task("arithmetic")
    assert task["name"] == "arithmetic"


def test_read_bigbench_task_missing_member(bigbench_archive):
    with pytest.raises(assets.AssetMissingError, match="no member"):
        assets.read_bigbench_member("no_such_task/task.json")


def test_vitaminc_drops_neither_and_contradictions(bigbench_archive):
    examples, provenance = data.read_vitaminc_examples()
    assert len(examples) == 60
    assert {label for _, _, label, _ in examples} == {0, 1}
    assert all(group == claim for _, claim, _, group in examples)
    assert provenance["source_file"].startswith(str(bigbench_archive))


def test_vitaminc_prepares_claim_prompts(bigbench_archive, model_dir, tmp_path, tokenizer):
    meta = data.prepare_task("qa", qa_cfg(dataset="bigbench-vitaminc", n_train=20, n_validation=4, n_test=6), model_dir, tmp_path / "qa")
    assert meta["examples"] == {"train": 20, "validation": 4, "test": 6}
    assert meta["label_meaning"]["1"] == "claim true (answer yes)"
    tail = tokenizer("\nIs the claim true? Answer:", add_special_tokens=False)["input_ids"]
    _, trail = data._special_tokens_around(tokenizer)
    row = load_from_disk(str(tmp_path / "qa"))["test"][0]["input_ids"]
    assert row[len(row) - len(trail) - len(tail): len(row) - len(trail)] == tail


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"dataset": "rt-review"}, "tasks.qa.dataset 'rt-review' is unknown; known data sets: .* Did you mean 'rt-reviews'\\?"),
        ({"kind": "causal_lm"}, "tasks.qa: data set 'rt-reviews' provides kind 'yes_no', but kind is 'causal_lm'"),
    ],
)
def test_check_names_bad_data_set(task, message, tmp_path):
    from conftest import study_dict, write_params

    from ntkattn.study import cli
    from ntkattn.study.config import ConfigError

    study = study_dict()
    study["tasks"]["qa"] = {"kind": "yes_no", "dataset": "rt-reviews", "n_train": 8, "n_validation": 4, "n_test": 4,
                            "max_length": 48, "max_val_examples": 4, **task}
    params = write_params(tmp_path / "params.yaml", study)
    with pytest.raises(ConfigError, match=message):
        cli.check_main(["--params", str(params)])

    # The per-stage quiet check skips the data modules; prepare-data still stops on the same value.
    assert cli.check_main(["--params", str(params), "--quiet"]) == 0
