"""A run whose loss or validation metric turns NaN stops, names where, and reaches no table.

The fault is injected by wrapping the task that the training loop builds, so the real loop,
checkpointing and error path run unchanged.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
from conftest import Workspace, study_dict, write_params

from ntkattn.study import aggregate, evaluate, train


class FaultyTask:
    """Wrap a task and turn its training loss (or a validation score) into NaN at one call."""

    def __init__(self, task, nan_loss_call: int | None = None, nan_score_call: int | None = None):
        self.task, self.nan_loss_call, self.nan_score_call = task, nan_loss_call, nan_score_call
        self.loss_calls = self.score_calls = 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        self.loss_calls += 1
        value = self.task.loss(model, batch)
        # Multiplying keeps the autograd graph, so the gradients turn NaN as a real blow-up's do.
        return value * math.nan if self.loss_calls == self.nan_loss_call else value

    def score(self, model, split, progress=False):
        self.score_calls += 1
        out = self.task.score(model, split, progress=progress)
        return {**out, "value": math.nan} if self.score_calls == self.nan_score_call else out


def inject_fault(monkeypatch, **calls) -> None:
    build = train.build_task
    monkeypatch.setattr(train, "build_task", lambda *args: FaultyTask(build(*args), **calls))


@pytest.fixture
def space(tiny_model, tiny_lm_data, tmp_path, monkeypatch) -> Workspace:
    space = Workspace(tmp_path, tiny_model, tiny_lm_data)
    data = study_dict()
    data["train"].update(steps=6, eval_every=2)
    write_params(space.params, data)
    monkeypatch.chdir(tmp_path)
    return space


def test_nan_loss_stops_run(space, monkeypatch, capsys):
    inject_fault(monkeypatch, nan_loss_call=3)
    run_dir = space.run_dir("lora")

    code = train.main(space.args("train", "lora")[1:])

    assert code == 3
    err = capsys.readouterr().err
    assert "error: loss is nan at run 'lora', task 'lm', seed 0, step 3" in err
    assert "lower train.lr" in err
    assert not (run_dir / "train.json").exists()
    assert not (run_dir / "live" / "metrics.json").exists()

    # The step-2 checkpoint, the last good one, stays complete in the resume folder. The output
    # folder gets no checkpoint, so nothing there looks like a finished run.
    assert not (run_dir / "checkpoint").exists()
    best_folders = list((space.root / ".cache" / "resume").glob("*/best_checkpoint"))
    assert len(best_folders) == 1
    assert (best_folders[0] / "method.json").is_file()
    assert (best_folders[0] / "adapter_model.safetensors").is_file()


def test_nan_validation_stops_run(space, monkeypatch, capsys):
    inject_fault(monkeypatch, nan_score_call=2)

    code = train.main(space.args("train", "lora")[1:])

    assert code == 3
    err = capsys.readouterr().err
    assert "error: validation perplexity is nan at run 'lora', seed 0, step 4" in err
    assert not (space.run_dir("lora") / "train.json").exists()


def test_rerun_drops_stale_summary(space, monkeypatch):
    """A failed rerun must not leave the previous run's train.json beside its own new checkpoint."""
    assert train.main(space.args("train", "lora")[1:]) == 0
    assert (space.run_dir("lora") / "train.json").is_file()

    inject_fault(monkeypatch, nan_loss_call=3)
    assert train.main(space.args("train", "lora")[1:]) == 3

    assert not (space.run_dir("lora") / "train.json").exists()


def test_nan_run_missing_from_table(space, monkeypatch, capsys):
    assert train.main(space.args("train", "frozen")[1:]) == 0
    assert evaluate.main(space.args("evaluate", "frozen")[1:]) == 0
    inject_fault(monkeypatch, nan_loss_call=3)
    assert train.main(space.args("train", "lora")[1:]) == 3
    capsys.readouterr()

    assert evaluate.main(space.args("evaluate", "lora")[1:]) == 2
    assert "lora/seed0/train.json not found" in capsys.readouterr().err
    assert not space.result("lora").exists()

    table = space.root / "results" / "ablation_table.csv"
    argv = ["--params", str(space.params), "--results", str(space.root / "results" / "runs"), "--out", str(table)]
    assert aggregate.main(argv) == 0
    assert "warning: lora lm seed 0: missing; left out of the means" in capsys.readouterr().err

    rows = {row["run"]: row for row in csv.DictReader(table.open())}
    assert rows["lora"]["lm_n_seeds"] == "0"
    assert rows["lora"]["lm_perplexity_mean"] == ""
    assert rows["lora"]["missing"] == "lm seed 0 (missing)"
    assert rows["frozen"]["lm_n_seeds"] == "1"
    frozen = json.loads(space.result("frozen").read_text())
    assert float(rows["frozen"]["lm_perplexity_mean"]) == pytest.approx(frozen["value"], rel=1e-9)
