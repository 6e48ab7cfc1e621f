"""A catalogue of bad inputs: each one must stop its command with a clear message and change nothing.

Every case damages a copy of a finished workspace (or writes a bad params.yaml), then runs one
`python -m ntkattn <command>`. The command must exit non-zero, print a line starting with
"error:" that names the culprit (key, value or path), print no Python traceback, and leave every
existing file under the workspace byte-identical with the same mtime.

The table runs in-process through the same dispatcher (`ntkattn.__main__.main`) for speed. A few
cases also run as real subprocesses by default, and all of them do in the tests marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from conftest import Workspace, cli_env, copy_workspace, snapshot, study_dict, write_params

from ntkattn import __main__ as dispatcher


@dataclass(frozen=True)
class Case:
    """One bad input: `setup` damages the workspace and returns the argv; `expect` must be in the message."""

    id: str
    setup: Callable[[Workspace, dict], list[str]]
    expect: tuple[str, ...]
    env: dict = field(default_factory=dict)


# ---- bad params.yaml, fed to the train stage of an already finished run ----


def bad_params(mutate: Callable[[dict], None], run: str = "lora", seed: int = 0):
    def setup(space: Workspace, env: dict) -> list[str]:
        data = study_dict()
        mutate(data)
        write_params(space.params, data)
        return space.args("train", run, seed)

    return setup


def set_key(*path_and_value):
    *path, value = path_and_value

    def mutate(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def add_ntk_run(ntk: dict):
    return set_key("runs", "ntk", {"method": "ntk", "ntk": ntk})


def params_text(text: str):
    def setup(space: Workspace, env: dict) -> list[str]:
        space.params.write_text(text)
        return space.args("train")

    return setup


def grid_on(base: str, tasks: list[str]):
    def mutate(data: dict) -> None:
        data["runs"]["ntk"] = {"method": "ntk"}
        data["grid"] = {"base": base, "feature_map": "random", "r": [8], "s": [2], "tasks": tasks}

    return mutate


CONFIG_CASES = [
    Case("unknown_key", bad_params(lambda d: d["train"].update(stpes=4)), ("unknown key train.stpes", "did you mean 'steps'")),
    Case("unknown_top_key", bad_params(lambda d: d.update(seed=[0])), ("unknown key seed", "did you mean 'seeds'")),
    Case("wrong_type", bad_params(set_key("train", "steps", "ten")), ("train.steps = 'ten'", "not of type 'integer'")),
    Case("lr_out_of_range", bad_params(set_key("train", "lr", 5.0)), ("train.lr = 5.0", "maximum of 1")),
    Case("lr_negative", bad_params(set_key("train", "lr", -1e-3)), ("train.lr = -0.001",)),
    Case("s_above_random_r", bad_params(add_ntk_run({"feature_map": "random", "r": 4, "s": 8})),
         ("runs.ntk.ntk", "s = 8 must be <= min(r, d) = 4")),
    Case("s_above_head_dim", bad_params(add_ntk_run({"s": 32})), ("runs.ntk.ntk", "s = 32 must be <= min(r, d) = 16")),
    Case("eval_every_above_steps", bad_params(set_key("train", "eval_every", 10)),
         ("train.eval_every = 10", "train.steps = 4")),
    Case("run_name_slash", bad_params(set_key("runs", "lo/ra", {"method": "lora"})), ("'lo/ra'", "not allowed")),
    Case("run_name_space", bad_params(set_key("runs", "lo ra", {"method": "lora"})), ("'lo ra'", "not allowed")),
    Case("grid_base_not_ntk", bad_params(grid_on("lora", ["lm"])), ("grid.base = 'lora' must be an ntk run",)),
    Case("grid_unknown_task", bad_params(grid_on("ntk", ["qa"])), ("grid.tasks has 'qa'", "tasks: ['lm']")),
    Case("override_key_mismatch", bad_params(set_key("runs", "lora", "ntk", {"use_k": False})),
         ("runs.lora.ntk", "rename the key to 'lora'")),
    Case("unknown_method", bad_params(set_key("runs", "lora", "method", "lorra")), ("runs.lora.method = 'lorra'",)),
    Case("hub_without_hub_id", bad_params(set_key("model", "source", "hub")), ("model.hub_id",)),
    Case("stride_above_context", bad_params(set_key("tasks", "lm", "eval_stride", 64)),
         ("tasks.lm.eval_stride = 64", "eval_context = 32")),
    Case("empty_seeds", bad_params(set_key("seeds", [])), ("seeds = []",)),
    Case("duplicate_seeds", bad_params(set_key("seeds", [0, 0])), ("seeds = [0, 0]", "non-unique")),
    Case("negative_seed", bad_params(set_key("seeds", [-1])), ("seeds.0 = -1",)),
    Case("params_not_yaml", params_text("study: [tiny\n"), ("params.yaml is not valid YAML",)),
    Case("params_not_mapping", params_text("- just\n- a list\n"), ("expected a mapping", "list")),
    Case("params_missing", lambda space, env: space.args("train", params=space.root / "nope.yaml"),
         ("nope.yaml", "not found")),
    Case("run_not_in_params", lambda space, env: space.args("train", "lroa"), ("unknown run 'lroa'",)),
    Case("seed_not_in_params", lambda space, env: space.args("train", "lora", 7), ("seed 7 is not in",)),
    Case("unknown_command", lambda space, env: ["trian"], ("unknown command 'trian'",)),
]


# ---- damaged prepared data and base model, fed to the train stage ----


def damaged_data(damage: Callable[[Path], None]):
    def setup(space: Workspace, env: dict) -> list[str]:
        data = space.root / "data" / "lm"
        shutil.copytree(space.data, data)
        damage(data)
        argv = space.args("train")
        argv[argv.index("--data") + 1] = str(data)
        return argv

    return setup


def empty_train_split(data: Path) -> None:
    from datasets import Dataset, load_from_disk

    features = load_from_disk(str(data / "train")).features
    shutil.rmtree(data / "train")
    Dataset.from_dict({"input_ids": [], "title": []}, features=features).save_to_disk(str(data / "train"))


def truncate(path: Path) -> None:
    """Cut a file to half its size, as a kill or a full disk during a copy would."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def set_meta_kind(data: Path) -> None:
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "kind": "yes_no"}))


def with_model(make_model: Callable[[Workspace], Path]):
    def setup(space: Workspace, env: dict) -> list[str]:
        argv = space.args("train")
        argv[argv.index("--model") + 1] = str(make_model(space))
        return argv

    return setup


def truncated_model_copy(space: Workspace) -> Path:
    folder = space.root / "models" / "base"
    shutil.copytree(space.model, folder)
    truncate(folder / "model.safetensors")
    return folder


DATA_CASES = [
    Case("split_folder_deleted", damaged_data(lambda d: shutil.rmtree(d / "validation")), ("lm/validation not found",)),
    Case("empty_arrow_table", damaged_data(empty_train_split), ("lm/train has no examples",)),
    Case("arrow_file_truncated", damaged_data(lambda d: truncate(next((d / "test").glob("*.arrow")))),
         ("lm/test", "cannot be read")),
    Case("meta_missing", damaged_data(lambda d: (d / "meta.json").unlink()), ("lm/meta.json not found",)),
    Case("meta_other_kind", damaged_data(set_meta_kind), ("kind 'yes_no'", "kind is 'causal_lm'")),
    Case("base_model_missing", with_model(lambda space: space.root / "models" / "missing"),
         ("models/missing/base_model.json not found",)),
    Case("base_model_truncated", with_model(truncated_model_copy), ("models/base", "cannot be loaded")),
]


# ---- damaged training outputs, fed to the evaluate stage ----


def damaged_run(run: str, damage: Callable[[Path], None]):
    def setup(space: Workspace, env: dict) -> list[str]:
        damage(space.run_dir(run))
        return space.args("evaluate", run)

    return setup


def write_summary(**changes):
    def damage(run_dir: Path) -> None:
        summary = json.loads((run_dir / "train.json").read_text())
        (run_dir / "train.json").write_text(json.dumps({**summary, **changes}))

    return damage


def set_method_marker(run_dir: Path) -> None:
    (run_dir / "checkpoint" / "method.json").write_text(json.dumps({"method": "full"}))


EVALUATE_CASES = [
    Case("adapter_truncated", damaged_run("lora", lambda r: truncate(r / "checkpoint" / "adapter_model.safetensors")),
         ("lora/seed0/checkpoint", "cannot be loaded")),
    Case("model_weights_truncated", damaged_run("full", lambda r: truncate(r / "checkpoint" / "model.safetensors")),
         ("full/seed0/checkpoint/model.safetensors cannot be loaded",)),
    Case("checkpoint_incomplete", damaged_run("lora", lambda r: (r / "checkpoint" / "method.json").unlink()),
         ("lora/seed0/checkpoint is not a complete checkpoint (no method.json)", "dvc repro --force")),
    Case("checkpoint_missing", damaged_run("lora", lambda r: shutil.rmtree(r / "checkpoint")),
         ("lora/seed0/checkpoint is not a complete checkpoint (the folder does not exist)",)),
    Case("checkpoint_other_method", damaged_run("lora", set_method_marker), ("holds a 'full' checkpoint", "'lora'")),
    Case("train_status_failed", damaged_run("lora", write_summary(status="failed")),
         ("lora/seed0/train.json has status 'failed'",)),
    Case("train_summary_missing", damaged_run("lora", lambda r: (r / "train.json").unlink()),
         ("lora/seed0/train.json not found",)),
    Case("train_summary_not_json", damaged_run("lora", lambda r: (r / "train.json").write_text('{"status": "o')),
         ("lora/seed0/train.json cannot be read",)),
]


# ---- damaged result files, fed to aggregate; missing offline assets, fed to the prepare stages ----


def damaged_result(damage: Callable[[Path], None]):
    def setup(space: Workspace, env: dict) -> list[str]:
        from ntkattn.study import aggregate

        argv = ["aggregate", "--params", str(space.params), "--results", str(space.root / "results" / "runs"),
                "--out", str(space.root / "results" / "ablation_table.csv")]
        # An earlier, good table must survive the failed run.
        assert aggregate.main(argv[1:]) == 0
        damage(space.result("lora"))
        return argv

    return setup


def edit_result(**changes):
    def damage(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return damage


def drop_value(path: Path) -> None:
    result = json.loads(path.read_text())
    del result["value"]
    path.write_text(json.dumps(result))


def missing_bigbench(space: Workspace, env: dict) -> list[str]:
    data = study_dict()
    data["tasks"]["qa"] = {"kind": "yes_no", "dataset": "bigbench-vitaminc", "n_train": 8, "n_validation": 4,
                           "n_test": 4, "max_length": 48, "max_val_examples": 4}
    write_params(space.params, data)
    empty = space.root / "empty_assets"
    empty.mkdir()
    env["NTKATTN_ASSETS"] = str(empty)
    return ["prepare-data", "--params", str(space.params), "--task", "qa", "--model", str(space.model),
            "--out", str(space.root / "data" / "qa")]


def missing_local_model(space: Workspace, env: dict) -> list[str]:
    data = study_dict()
    data["model"].update(source="local", path=str(space.root / "no_such_model"))
    write_params(space.params, data)
    return ["prepare-model", "--params", str(space.params), "--out", str(space.root / "models" / "base")]


OTHER_CASES = [
    Case("result_not_json", damaged_result(lambda p: p.write_text("{\"task\": ")), ("lora/seed0.json: cannot read JSON",)),
    Case("result_wrong_seed", damaged_result(edit_result(seed=5)), ("lora/seed0.json: seed is 5, expected 0",)),
    Case("result_missing_value", damaged_result(drop_value), ("lora/seed0.json: missing key 'value'",)),
    Case("result_wrong_type", damaged_result(edit_result(trainable_params="896")), ("lora/seed0.json: trainable_params",)),
    Case("asset_missing", missing_bigbench, ("BIG-bench archive", "empty_assets", "ntkattn fetch-assets")),
    Case("local_model_missing", missing_local_model, ("model.path", "no_such_model", "is not a folder")),
]

CASES = CONFIG_CASES + DATA_CASES + EVALUATE_CASES + OTHER_CASES

# Cases that also run as real subprocesses in the default (fast) test run, one per stage kind.
CLI_SMOKE = {"unknown_key", "base_model_missing", "result_not_json"}


def prepare(case: Case, finished_workspace: Workspace, tmp_path: Path) -> tuple[Workspace, list[str], dict]:
    space = copy_workspace(finished_workspace, tmp_path / "ws")
    env: dict = {}
    argv = case.setup(space, env)
    return space, argv, env


def check_failure(case: Case, code: int, stderr: str) -> None:
    assert code != 0, f"{case.id}: exit code 0"
    assert "Traceback" not in stderr, f"{case.id}: traceback in stderr:\n{stderr}"
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, f"{case.id}: no line starting with 'error: ' in stderr:\n{stderr}"
    message = "\n".join(lines[starts[0]:])
    for part in case.expect:
        assert part in message, f"{case.id}: {part!r} not in the message:\n{message}"


def test_catalogue_size():
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_in_process(case, finished_workspace, tmp_path, monkeypatch, capsys):
    space, argv, env = prepare(case, finished_workspace, tmp_path)
    before = snapshot(space.root)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(space.root)
    capsys.readouterr()

    code = dispatcher.main(argv)

    check_failure(case, code, capsys.readouterr().err)
    assert snapshot(space.root) == before, f"{case.id}: files changed under {space.root}"


# Every case already runs in-process above; as a subprocess only a few run by default, because each
# costs a fresh interpreter (about 4 s of imports). `pytest -m exhaustive` runs them all.
CLI_PARAMS = [pytest.param(case, marks=() if case.id in CLI_SMOKE else pytest.mark.exhaustive, id=case.id)
              for case in CASES]


@pytest.mark.parametrize("case", CLI_PARAMS)
def test_bad_input_cli(case, finished_workspace, tmp_path):
    space, argv, env = prepare(case, finished_workspace, tmp_path)
    before = snapshot(space.root)

    done = subprocess.run([sys.executable, "-m", "ntkattn", *argv], cwd=space.root, env=cli_env(**env),
                          capture_output=True, text=True, timeout=300)

    check_failure(case, done.returncode, done.stderr)
    assert snapshot(space.root) == before, f"{case.id}: files changed under {space.root}"
