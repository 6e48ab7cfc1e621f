"""Every study preset in studies/: it validates, its DAG resolves, and its task code runs.

The paper-scale presets name hub models and data sets that are never downloaded here. Their
tasks run end to end (prepare data, train 2 steps, evaluate) on a tiny random-weight model of the
same architecture class, with each hub data set replaced by a small local table in the format
`datasets.load_dataset` returns for it. The quick presets run their real pretrain-in-pipeline
path with 2 pretraining steps on the real local data.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from ntkattn.study import data_hub
from ntkattn.study.config import validate

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.stem for p in (REPO / "studies").glob("*.yaml"))
RUN_TABLE = ["frozen", "full", "lora", "prefix", "ntk", "ntk_no_k", "ntk_full_z"]
# Studies whose base model is a ViT leave prefix tuning out (PEFT prefix tuning needs a text model).
IMAGE_STUDIES = {"vit", "quick_vision"}
TINY_TEXT = {"hidden_size": 64, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 64}
TINY_VIT = {"hidden_size": 64, "layers": 1, "heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def load_preset(name: str) -> dict:
    return yaml.safe_load((REPO / "studies" / f"{name}.yaml").read_text())


# ---- presets and DAGs ----

@pytest.mark.parametrize("name", STUDIES)
def test_preset_validates(name):
    data = load_preset(name)
    study = validate(data, origin=f"studies/{name}.yaml")
    assert study.name == name


@pytest.mark.parametrize("name", STUDIES)
def test_preset_has_run_table(name):
    runs = load_preset(name)["runs"]
    expected = [r for r in RUN_TABLE if not (name in IMAGE_STUDIES and r == "prefix")]
    assert list(runs)[: len(expected)] == expected
    assert runs["ntk_no_k"]["ntk"] == {"use_k": False}
    assert runs["ntk_full_z"]["ntk"] == {"z_rank": "full"}


@pytest.mark.parametrize("name", STUDIES)
def test_preset_dag_resolves(name, tmp_path, monkeypatch):
    from dvc.repo import Repo

    from ntkattn.study.dvc_bridge import read_stages

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "studies" / f"{name}.yaml", tmp_path / "params.yaml")
    Repo.init(str(tmp_path), no_scm=True).close()
    monkeypatch.chdir(tmp_path)  # DVC names stages relative to the working directory
    stages = read_stages(".", with_status=False)

    study = validate(load_preset(name))
    jobs = len(study.expected_results())
    expected = 1 + len(study.tasks) + 2 * jobs + 1  # prepare_model, prepare_data, train + evaluate, aggregate
    assert len(stages) == expected
    assert stages[0].name == "prepare_model"
    assert stages[-1].name == "aggregate"


# ---- local stand-ins of the hub data sets ----

WORDS = "the of and a in to was is for on as by with he at from his an were are which this be".split()


def _sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _images(rng: random.Random, n: int) -> list:
    from PIL import Image

    return [Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))) for _ in range(n)]


def _superglue_rows(config: str, n: int, rng: random.Random) -> dict:
    s = lambda: _sentence(rng)  # noqa: E731
    labels = [i % 2 for i in range(n)]
    if config == "boolq":
        return {"question": [s() for _ in range(n)], "passage": [s() for _ in range(n)], "idx": list(range(n)), "label": labels}
    if config == "rte":
        return {"premise": [s() for _ in range(n)], "hypothesis": [s() for _ in range(n)], "idx": list(range(n)), "label": labels}
    if config == "wic":
        return {"word": ["bank"] * n, "sentence1": [s() for _ in range(n)], "sentence2": [s() for _ in range(n)],
                "start1": [0] * n, "start2": [0] * n, "end1": [4] * n, "end2": [4] * n, "idx": list(range(n)), "label": labels}
    if config == "wsc.fixed":
        return {"text": [s() for _ in range(n)], "span1_index": [0] * n, "span2_index": [3] * n,
                "span1_text": ["the"] * n, "span2_text": ["he"] * n, "idx": list(range(n)), "label": labels}
    if config == "multirc":
        return {"paragraph": [s() for _ in range(n)], "question": [s() for _ in range(n)], "answer": [s() for _ in range(n)],
                "idx": [{"paragraph": i // 3, "question": i, "answer": i} for i in range(n)], "label": labels}
    raise AssertionError(f"no fixture for SuperGLUE config {config}")


def fake_hub(requested: list):
    """Return a stand-in for data_hub.load_hub_dataset that records each (id, config) it serves."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    def load(hub_id, config=None):
        requested.append((hub_id, config))
        rng = random.Random(0)
        if hub_id == "Salesforce/wikitext":
            assert config == "wikitext-103-raw-v1"
            lines = lambda n: [" = Title = \n"] + [f" {_sentence(rng, 40)} \n" for _ in range(n)]  # noqa: E731
            return DatasetDict({s: Dataset.from_dict({"text": lines(60)}) for s in ("train", "validation", "test")})
        if hub_id == "aps/super_glue":
            return DatasetDict({s: Dataset.from_dict(_superglue_rows(config, 30, rng)) for s in ("train", "validation", "test")})
        if hub_id in ("uoft-cs/cifar100", "ethz/food101"):
            image_col, label_col, n_labels = ("img", "fine_label", 100) if "cifar" in hub_id else ("image", "label", 101)
            features = Features({image_col: Image(), label_col: ClassLabel(names=[f"class{i}" for i in range(n_labels)])})
            table = lambda n: Dataset.from_dict(  # noqa: E731
                {image_col: _images(rng, n), label_col: [rng.randrange(n_labels) for _ in range(n)]}, features=features)
            return DatasetDict({"train": table(24), ("test" if "cifar" in hub_id else "validation"): table(8)})
        if hub_id == "openai/gsm8k":
            pairs = data_hub.read_gsm_symbolic_originals()
            table = lambda rows: Dataset.from_dict({"question": [q for q, _ in rows], "answer": [a for _, a in rows]})  # noqa: E731
            return DatasetDict({"train": table(pairs[:60]), "test": table(pairs[60:])})
        raise AssertionError(f"unexpected hub data set {hub_id!r}")

    return load


# ---- end to end on tiny models ----

def tiny_params(name: str) -> dict:
    """The preset with a tiny random model of the same class, small splits and 2 training steps."""
    data = copy.deepcopy(load_preset(name))
    source = data["model"]["source"]
    if source.startswith("pretrain-"):
        data["model"]["pretrain"] = {"steps": 2, "batch_size": 4, "block_size": 32, "max_images": 64, "max_articles": 12,
                                     "threads": 1}
    else:
        is_vit = name in IMAGE_STUDIES
        data["model"] = {"source": "random-vit" if is_vit else "random-llama", "hub_id": None, "tokenizer": None,
                         "dtype": "float32", "tiny": TINY_VIT if is_vit else TINY_TEXT}
    for task in data["tasks"].values():
        small = {"n_train": 12, "n_validation": 4, "n_test": 6, "max_val_examples": 4, "max_length": 96,
                 "max_new_tokens": 4, "block_size": 16, "eval_context": 32, "eval_stride": 32,
                 "max_eval_tokens": 256, "max_val_tokens": 64}
        task.update({k: v for k, v in small.items() if k in task or (k == "max_new_tokens" and task["kind"] == "math")})
        if task["dataset"] == "gensim-wiki":
            task["max_articles"] = 12  # parse the first 12 articles of the dump, not all 106
    data["train"].update(steps=2, batch_size=2, grad_accum=1, warmup_steps=1, eval_every=1, threads=1,
                         mixed_precision="fp32", gradient_checkpointing=False,
                         accelerate_config="workflow/accelerate/cpu.yaml")
    data["seeds"] = [0]
    return data


def runs_to_check(study: dict, task_index: int) -> list[str]:
    # Every run on the first task; NTK-Attention alone on the others, to keep the test short.
    return list(study["runs"]) if task_index == 0 else ["ntk"]


# default and smoke also run whole in tests/test_pipeline_e2e.py, so their run here is marked slow.
END_TO_END = [pytest.param(name, marks=pytest.mark.slow) if name in ("default", "smoke") else name for name in STUDIES]


@pytest.mark.parametrize("name", END_TO_END)
def test_study_tasks_end_to_end(name, tmp_path, monkeypatch):
    from ntkattn.study import base_model, data, evaluate, train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    requested: list = []
    monkeypatch.setattr(data_hub, "load_hub_dataset", fake_hub(requested))
    study = tiny_params(name)
    if any(t["dataset"] == "bigbench-cifar10" for t in study["tasks"].values()):
        from ntkattn.study.assets import AssetMissingError, bigbench_archive

        try:
            bigbench_archive()
        except AssetMissingError as error:
            pytest.skip(str(error))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(study))
    model = tmp_path / "models" / "base"
    assert base_model.main(["--params", str(params), "--out", str(model)]) == 0
    meta = json.loads((model / "base_model.json").read_text())
    if study["model"]["source"].startswith("pretrain-"):
        assert meta["pretrained_in_pipeline"] is True
        assert "PRETRAINED INSIDE THIS PIPELINE" in meta["note"]

    for index, (task, cfg) in enumerate(study["tasks"].items()):
        folder = tmp_path / "data" / task
        assert data.main(["--params", str(params), "--task", task, "--model", str(model), "--out", str(folder)]) == 0
        assert json.loads((folder / "meta.json").read_text())["kind"] == cfg["kind"]
        for run in runs_to_check(study, index):
            out = tmp_path / "runs" / task / run
            common = ["--params", str(params), "--task", task, "--run", run, "--seed", "0", "--data", str(folder), "--model", str(model)]
            assert train.main(common + ["--out", str(out), "--resume-dir", str(tmp_path / "resume")]) == 0
            result_path = tmp_path / "results" / task / f"{run}.json"
            assert evaluate.main(common + ["--train-dir", str(out), "--out", str(result_path)]) == 0
            result = json.loads(result_path.read_text())
            assert result["status"] == "ok"
            assert result["value"] == result["value"], f"{task}/{run}: metric is NaN"
            if result["metric"] == "accuracy":
                assert 0.0 <= result["value"] <= 1.0
            if run == "frozen":
                assert result["trainable_params"] == 0
    hub_ids = {hub_id for hub_id, _ in requested}
    expected_hub = {"llama8b_wikitext": {"Salesforce/wikitext"}, "superglue": {"aps/super_glue"},
                    "vit": {"uoft-cs/cifar100", "ethz/food101"}, "gsm8k": {"openai/gsm8k"}}.get(name, set())
    assert hub_ids == expected_hub


# ---- units of the new task kinds ----

@pytest.mark.parametrize("text, number", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,000", "1000"), ("The answer is 12.50 dollars", "12.5"),
    ("#### -3", "-3"), ("no number here", None), ("first 4 then 9", "9"),
])
def test_final_number(text, number):
    from ntkattn.study.tasks_math import final_number

    assert final_number(text) == number


def test_gsm_symbolic_answers_have_final_number():
    from ntkattn.study.tasks_math import final_number

    pairs = data_hub.read_gsm_symbolic_originals()
    assert len(pairs) == 100
    assert all("####" in answer and final_number(answer) is not None for _, answer in pairs)


def test_hub_loader_names_dataset_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("NTKATTN_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(data_hub.DataHubError) as caught:
        data_hub.load_hub_dataset("aps/super_glue", "boolq")
    assert "aps/super_glue" in str(caught.value)
    assert "load_dataset('aps/super_glue', 'boolq')" in str(caught.value)


def test_fashion_mnist_idx_reads():
    from ntkattn.study.data_vision import FASHION_MNIST_DIR, read_fashion_mnist

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    images, labels = read_fashion_mnist("t10k")
    assert images.shape == (10000, 28, 28)
    assert labels.shape == (10000,)
    assert set(labels.tolist()) == set(range(10))
