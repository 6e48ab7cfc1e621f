"""Same seed, same numbers; every result carries its provenance; nothing unsafe is loaded or leaked."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, Workspace

from ntkattn.study import evaluate, provenance, train
from ntkattn.study.config import load_study

SECRET = "hf_secret_value_123"


@pytest.fixture(scope="module")
def second_run(finished_workspace, tmp_path_factory):
    """Train and evaluate lora again, in a new workspace, with a secret-like variable set.

    Returns (workspace, text printed to stdout, stderr and the log).
    """
    import logging

    space = Workspace(tmp_path_factory.mktemp("again"), finished_workspace.model, finished_workspace.data)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch, _captured() as output:
            patch.setenv("HF_TOKEN", SECRET)
            patch.chdir(space.root)
            assert train.main(space.args("train", "lora")[1:]) == 0
            assert evaluate.main(space.args("evaluate", "lora")[1:]) == 0
    finally:
        logging.getLogger().removeHandler(handler)
    return space, output.getvalue() + "\n".join(records)


def _captured():
    """Capture stdout and stderr, both Python-level, into one buffer."""
    import contextlib
    import io

    buffer = io.StringIO()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(buffer))
    stack.enter_context(contextlib.redirect_stderr(buffer))

    @contextlib.contextmanager
    def manager():
        with stack:
            yield buffer

    return manager()


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_same_seed_same_validation(finished_workspace, second_run):
    space, _ = second_run
    first = read(finished_workspace.run_dir("lora") / "train.json")
    second = read(space.run_dir("lora") / "train.json")

    assert second["validation_history"] == first["validation_history"]
    assert second["best_validation"] == first["best_validation"]
    assert second["best_step"] == first["best_step"]
    assert second["trainable_params"] == first["trainable_params"]


def test_same_seed_same_test_metrics(finished_workspace, second_run):
    space, _ = second_run
    first = read(finished_workspace.result("lora"))
    second = read(space.result("lora"))

    assert second["value"] == first["value"]
    assert second["test"] == first["test"]


def test_result_records_provenance(second_run):
    space, _ = second_run
    result = read(space.result("lora"))
    spec = load_study(space.params).resolve("lm", "lora", 0)

    assert result["status"] == "ok"
    assert result["config"]["train"] == spec.train.to_dict()
    assert result["config"]["method"] == spec.method_cfg.to_dict()
    for stage in ("train", "evaluate"):
        record = result["provenance"][stage]
        assert set(record["git"]) == {"commit", "dirty"}
        assert record["packages"]["torch"].startswith("2.13.0")
        assert record["packages"]["ntkattn"]
        assert {"platform", "python", "cpu_count", "torch_threads", "cuda"} <= set(record["hardware"])
    for key in ("train_time_s", "eval_time_s", "peak_mem_mb", "eval_peak_mem_mb"):
        assert result[key] > 0, key


def test_git_state_commit_and_dirty(tmp_path):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": "/usr/bin:/bin"}
    (tmp_path / "params.yaml").write_text("study: tiny\n")
    for command in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "first"]):
        subprocess.run(["git", *command], cwd=tmp_path, env=env, check=True)

    clean = provenance.git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean["commit"])
    assert clean["dirty"] is False

    (tmp_path / "params.yaml").write_text("study: edited\n")
    assert provenance.git_state(tmp_path) == {"commit": clean["commit"], "dirty": True}


def test_git_state_outside_repository(tmp_path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}


# ---- safe loading and secrets ----


def source_files() -> list[Path]:
    return sorted((REPO / "src").rglob("*.py"))


def calls(text: str, name: str) -> list[str]:
    """Return the full text of every call `name(...)` in `text`, parentheses balanced."""
    found = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        found.append(text[match.start(): end + 1])
    return found


def test_torch_load_weights_only():
    for path in source_files():
        for call in calls(path.read_text(), "torch.load"):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_no_unsafe_loaders():
    for path in source_files():
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        assert not re.search(r"\bpickle\.loads?\(", text), path
        assert not re.search(r"\byaml\.load\(", text), path
        assert not re.search(r"\byaml\.unsafe_load\(", text), path


def test_remote_code_only_from_config():
    """trust_remote_code is either False or the value of model.trust_remote_code."""
    for path in source_files():
        for value in re.findall(r"trust_remote_code=([A-Za-z_]+)", path.read_text()):
            assert value in ("False", "remote_code"), f"{path}: trust_remote_code={value}"
    text = (REPO / "src" / "ntkattn" / "study" / "base_model.py").read_text()
    assert 'remote_code = bool(_option(model_cfg, "trust_remote_code", False))' in text


def test_secret_never_written(second_run):
    space, output = second_run
    files = [space.run_dir("lora") / "train.json", space.result("lora")]
    files += [p for p in space.run_dir("lora").rglob("*") if p.is_file() and p.suffix in (".json", ".tsv", ".md")]
    for path in files:
        assert SECRET not in path.read_text(), path
    assert "test perplexity" in output
    assert SECRET not in output


def test_write_json_redacts_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = tmp_path / "result.json"

    provenance.write_json_atomic(path, {"note": f"token {SECRET} leaked into a message"})

    assert SECRET not in path.read_text()
    assert read(path)["note"] == "token <HF_TOKEN redacted> leaked into a message"
