"""A killed training run resumes from its last validation point and ends bit-identical on CPU.

The interrupted run is a real `python -m ntkattn train` subprocess, killed with SIGKILL once its
first resume state exists. The rerun and the uninterrupted reference run in-process, so the test
also shows that a subprocess and an in-process run compute the same numbers.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Workspace, cli_env, study_dict, write_params
from safetensors.torch import load_file

from ntkattn.study import tasks, train
from ntkattn.study.config import load_study

STEPS = 40


def long_study() -> dict:
    data = study_dict()
    data["train"].update(steps=STEPS, eval_every=2, warmup_steps=2)
    return data


def new_workspace(root: Path, model: Path, data: Path) -> Workspace:
    space = Workspace(root, model, data)
    write_params(space.params, long_study())
    return space


def train_in_process(space: Workspace, monkeypatch) -> dict:
    monkeypatch.chdir(space.root)
    assert train.main(space.args("train", "lora")[1:]) == 0
    return json.loads((space.run_dir("lora") / "train.json").read_text())


def checkpoint_tensors(space: Workspace) -> dict[str, torch.Tensor]:
    return load_file(str(space.run_dir("lora") / "checkpoint" / "adapter_model.safetensors"))


def resume_states(space: Workspace) -> list[Path]:
    return sorted((space.root / ".cache" / "resume").glob("*/state.pt"))


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_lm_data, tmp_path_factory):
    """The uninterrupted run: (train.json, checkpoint tensors)."""
    with pytest.MonkeyPatch.context() as patch:
        space = new_workspace(tmp_path_factory.mktemp("reference"), tiny_model, tiny_lm_data)
        summary = train_in_process(space, patch)
    return summary, checkpoint_tensors(space)


def kill_after_first_state(space: Workspace) -> None:
    """Start the train stage as a subprocess and SIGKILL it soon after its first resume state appears."""
    process = subprocess.Popen([sys.executable, "-m", "ntkattn", *space.args("train", "lora")], cwd=space.root,
                               env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not resume_states(space):
            assert process.poll() is None, f"train ended (code {process.returncode}) before writing resume state"
            assert time.monotonic() < deadline, "no resume state after 120 s"
            time.sleep(0.01)
        time.sleep(0.2)
        assert process.poll() is None, "train finished before the kill; raise STEPS"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL


def test_kill_then_resume_matches(reference, tiny_model, tiny_lm_data, tmp_path, monkeypatch, capsys):
    space = new_workspace(tmp_path, tiny_model, tiny_lm_data)
    run_dir = space.run_dir("lora")

    kill_after_first_state(space)

    # Nothing half-written is visible: no summary, and a checkpoint folder only when complete.
    assert not (run_dir / "train.json").exists()
    if (run_dir / "checkpoint").exists():
        assert (run_dir / "checkpoint" / "method.json").is_file()
    assert len(resume_states(space)) == 1

    capsys.readouterr()
    summary = train_in_process(space, monkeypatch)
    assert "resuming from step" in capsys.readouterr().out

    expected_summary, expected_tensors = reference
    assert summary["validation_history"] == expected_summary["validation_history"]
    assert summary["best_validation"] == expected_summary["best_validation"]
    assert summary["best_step"] == expected_summary["best_step"]
    tensors = checkpoint_tensors(space)
    assert tensors.keys() == expected_tensors.keys()
    for name, tensor in expected_tensors.items():
        assert torch.equal(tensors[name], tensor), name

    # The finished run cleared its resume state and left no staging folders in its output.
    assert resume_states(space) == []
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []


def test_unreadable_state_restarts(reference, tiny_model, tiny_lm_data, tmp_path, monkeypatch, caplog):
    space = new_workspace(tmp_path, tiny_model, tiny_lm_data)
    study = load_study(space.params)
    spec = study.resolve("lm", "lora", 0)
    folder = space.root / ".cache" / "resume" / f"lm-lora-seed0-{train.spec_digest(spec, study.raw['model'])}"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"PK\x03\x04 cut short by a kill")

    summary = train_in_process(space, monkeypatch)

    assert "is unreadable" in caplog.text
    assert summary["validation_history"] == reference[0]["validation_history"]
    assert not folder.exists()


def test_state_of_other_settings_ignored(reference, tiny_model, tiny_lm_data, tmp_path):
    """Resume state is keyed by a digest of the resolved settings, so an edited lr never reuses it."""
    space = new_workspace(tmp_path, tiny_model, tiny_lm_data)
    study = load_study(space.params)
    data = long_study()
    data["runs"]["lora"]["train"] = {"lr": 2.0e-3}
    edited = load_study(write_params(tmp_path / "edited.yaml", data))

    digest = train.spec_digest(study.resolve("lm", "lora", 0), study.raw["model"])
    edited_digest = train.spec_digest(edited.resolve("lm", "lora", 0), edited.raw["model"])
    assert digest != edited_digest


class Interrupted(Exception):
    """Stands in for a kill right after a resume state was written."""


def scripted_validation(monkeypatch, values: list[float]) -> None:
    """Make the LM task's validation return `values` in order (perplexity: lower is better)."""
    # The function from its own module, so a second call replaces the first script, not wraps it.
    real_build = tasks.build_task
    pending = list(values)

    def build(*args, **kwargs):
        task = real_build(*args, **kwargs)
        real_score = task.score

        def score(model, split, *rest, **options):
            result = real_score(model, split, *rest, **options)
            return {**result, "value": pending.pop(0)} if split == "validation" else result

        task.score = score
        return task

    monkeypatch.setattr(train, "build_task", build)


def test_best_checkpoint_survives_deleted_output(tiny_model, tiny_lm_data, tmp_path, monkeypatch):
    """`dvc repro` deletes a stage's outputs before rerunning it; a resumed run whose best step came
    before the interruption must still end with that step's checkpoint."""
    space = new_workspace(tmp_path, tiny_model, tiny_lm_data)
    run_dir = space.run_dir("lora")
    monkeypatch.chdir(space.root)

    # First attempt: the best validation is at step 2, the interruption after the state of step 4.
    scripted_validation(monkeypatch, [10.0, 20.0])
    saves = []
    real_save = train.ResumeState.save

    def save_then_stop(self, *args):
        real_save(self, *args)
        saves.append(args[-1]["step"])
        if len(saves) == 2:
            raise Interrupted

    monkeypatch.setattr(train.ResumeState, "save", save_then_stop)
    with pytest.raises(Interrupted):
        train.main(space.args("train", "lora")[1:])
    assert saves == [2, 4]
    # The step-2 checkpoint, wherever the interrupted run kept it.
    saved = [run_dir / "checkpoint", *(space.root / ".cache" / "resume").glob("*/best_checkpoint")]
    saved = [folder for folder in saved if (folder / "method.json").is_file()]
    assert len(saved) == 1
    expected = load_file(str(saved[0] / "adapter_model.safetensors"))

    # What DVC does before the rerun, then a rerun in which no later step is better.
    shutil.rmtree(run_dir)
    monkeypatch.setattr(train.ResumeState, "save", real_save)
    scripted_validation(monkeypatch, [20.0] * (STEPS // 2 - 2))
    summary = train_in_process(space, monkeypatch)

    assert summary["best_step"] == 2
    assert (run_dir / "checkpoint" / "method.json").is_file()
    tensors = checkpoint_tensors(space)
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    assert resume_states(space) == []
