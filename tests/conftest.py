"""Shared fixtures: a tiny random-llama base model, tiny prepared LM data and a tiny study.

The model and data are built once per test session by the real preparation functions
(base_model.save_base_model, data.prepare_task), so the tests exercise the same files that
`dvc repro` produces. Everything lives in pytest's temporary folders, outside any git repository.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {"hidden_size": 32, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate_size": 64}

# A smoke-like study cut down to one LM task on a few articles; every stage finishes in seconds.
TINY_STUDY = {
    "study": "tiny",
    "model": {"source": "random-llama", "hub_id": None, "tokenizer": None, "dtype": "float32", "tiny": TINY_MODEL},
    "tasks": {
        "lm": {
            "kind": "causal_lm", "dataset": "gensim-wiki", "split_fractions": {"validation": 0.2, "test": 0.2},
            "max_articles": 12, "block_size": 16, "eval_context": 32, "eval_stride": 16,
            "max_eval_tokens": 128, "max_val_tokens": 64,
        },
    },
    "train": {
        "steps": 4, "batch_size": 2, "grad_accum": 1, "lr": 1.0e-3, "warmup_steps": 1, "schedule": "cosine",
        "weight_decay": 0.0, "max_grad_norm": 1.0, "eval_every": 2, "mixed_precision": "fp32",
        "gradient_checkpointing": False, "threads": 1, "accelerate_config": "workflow/accelerate/cpu.yaml",
    },
    "methods": {
        "frozen": {}, "full": {},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "prefix": {"num_virtual_tokens": 4},
        "ntk": {"feature_map": "elu", "r": None, "s": 4, "z_rank": "low", "use_k": True, "dropout": 0.0,
                "init_std": 0.02, "impl": "fast"},
    },
    "runs": {
        "frozen": {"method": "frozen"},
        "full": {"method": "full", "train": {"lr": 1.0e-4}},
        "lora": {"method": "lora"},
    },
    "grid": {"base": "lora", "r": [], "s": [], "tasks": []},
    "seeds": [0],
}

# Offline everywhere: no hub, no analytics, no tokenizer thread pools competing for the 2 cores.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
}


def study_dict(**changes) -> dict:
    """Return a deep copy of TINY_STUDY with top-level sections replaced by `changes`."""
    data = copy.deepcopy(TINY_STUDY)
    data.update(copy.deepcopy(changes))
    return data


def write_params(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict:
    """Environment for `python -m ntkattn` subprocesses: offline, with this venv's bin first on PATH."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def stage_args(command: str, params: Path, workspace: Path, model: Path, data: Path, run: str = "lora",
               seed: int = 0, out: Path | None = None) -> list[str]:
    """Build `[command, options...]` of a train or evaluate call, with paths laid out as in dvc.yaml."""
    argv = [command, "--params", str(params), "--task", "lm", "--run", run, "--seed", str(seed),
            "--data", str(data), "--model", str(model)]
    run_dir = workspace / "runs" / "lm" / run / f"seed{seed}"
    if command == "train":
        return argv + ["--out", str(out or run_dir), "--resume-dir", str(workspace / ".cache" / "resume")]
    result = workspace / "results" / "runs" / "lm" / run / f"seed{seed}.json"
    return argv + ["--train-dir", str(run_dir), "--out", str(out or result)]


@pytest.fixture(scope="session", autouse=True)
def offline_env():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE_ENV.items():
            patch.setenv(key, value)
        torch.set_num_threads(1)
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a random-llama base model (hidden 32, 2 layers) written by save_base_model."""
    from ntkattn.study import base_model
    from ntkattn.study.config import validate

    folder = tmp_path_factory.mktemp("tiny") / "models" / "base"
    base_model.save_base_model(validate(study_dict()).model, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_data(tiny_model, tmp_path_factory) -> Path:
    """Prepared LM data folder (train/validation/test + meta.json) of 12 Wikipedia articles."""
    from ntkattn.study import data
    from ntkattn.study.config import validate

    folder = tmp_path_factory.mktemp("tiny") / "data" / "lm"
    data.prepare_task("lm", validate(study_dict()).tasks["lm"], tiny_model, folder)
    return folder


class Workspace:
    """A study folder laid out as dvc.yaml lays it out, with runs/ and results/ of finished jobs."""

    def __init__(self, root: Path, model: Path, data: Path):
        self.root, self.model, self.data = root, model, data
        self.params = write_params(root / "params.yaml", study_dict())

    def args(self, command: str, run: str = "lora", seed: int = 0, **kwargs) -> list[str]:
        return stage_args(command, kwargs.pop("params", self.params), self.root, self.model, self.data, run, seed, **kwargs)

    def run_dir(self, run: str, seed: int = 0) -> Path:
        return self.root / "runs" / "lm" / run / f"seed{seed}"

    def result(self, run: str, seed: int = 0) -> Path:
        return self.root / "results" / "runs" / "lm" / run / f"seed{seed}.json"


@pytest.fixture(scope="session")
def finished_workspace(tiny_model, tiny_lm_data, tmp_path_factory) -> Workspace:
    """Workspace where frozen, full and lora (seed 0) are trained and evaluated, in-process.

    Tests must not modify it: copy what they damage (see `copy_workspace`).
    """
    from ntkattn.study import evaluate, train

    root = tmp_path_factory.mktemp("finished")
    space = Workspace(root, tiny_model, tiny_lm_data)
    with pytest.MonkeyPatch.context() as patch:
        # provenance and dvclive look at the working folder; keep them away from the repository.
        patch.chdir(root)
        for run in ("frozen", "full", "lora"):
            assert train.main(space.args("train", run)[1:]) == 0
            assert evaluate.main(space.args("evaluate", run)[1:]) == 0
    return space


def copy_workspace(space: Workspace, dest: Path) -> Workspace:
    """Copy runs/, results/ and params.yaml of `space`; model and data stay shared (read-only use)."""
    import shutil

    for name in ("runs", "results"):
        shutil.copytree(space.root / name, dest / name, copy_function=shutil.copy2)
    return Workspace(dest, space.model, space.data)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Map every file under `folder` to (content, mtime_ns), to prove a failed command changed nothing."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}
