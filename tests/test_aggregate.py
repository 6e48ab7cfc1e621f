import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ntkattn.study.aggregate import main, run_rows
from ntkattn.study.config import validate

T_975_DF1 = 12.7062047

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def make_params():
    """Take model, train and methods from the repository's params.yaml, with a small run table."""
    params = yaml.safe_load(REPO_PARAMS.read_text())
    kinds = {cfg["kind"]: cfg for cfg in params["tasks"].values()}
    params.update(
        study="unit_test",
        tasks={"lm": kinds["causal_lm"], "qa": kinds["yes_no"]},
        runs={
            "frozen": {"method": "frozen"},
            "ntk": {"method": "ntk", "train": {"lr": 1e-3}},
            "ntk_no_k": {"method": "ntk", "ntk": {"use_k": False}},
            "ntk_full_z": {"method": "ntk", "ntk": {"z_rank": "full"}},
        },
        grid={"base": "ntk", "feature_map": "random", "r": [32, 128], "s": [4], "tasks": ["lm"]},
        seeds=[0, 1],
    )
    return params


# (task, run) -> value per seed; None means the file is left out.
VALUES = {
    ("lm", "frozen"): [30.0, 30.0],
    ("qa", "frozen"): [0.5, 0.5],
    ("lm", "ntk"): [10.0, 12.0],
    ("qa", "ntk"): [0.70, 0.80],
    ("lm", "ntk_no_k"): [14.0, 16.0],
    ("qa", "ntk_no_k"): [0.60, "failed"],
    ("lm", "ntk_full_z"): [9.0, None],
    ("qa", "ntk_full_z"): [0.9, 0.7],
    ("lm", "ntk_r32_s4"): [20.0, 22.0],
    ("lm", "ntk_r128_s4"): [18.0, 18.0],
}


def write_result(results, task, run, seed, value, changes=None):
    path = results / task / run / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "task": task, "run": run, "seed": seed, "method": "frozen" if run == "frozen" else "ntk",
        "status": "ok", "metric": "perplexity" if task == "lm" else "accuracy", "value": value,
        "trainable_params": 0 if run == "frozen" else 100, "total_params": 1000 if run == "frozen" else 1100,
        "train_time_s": 2.0 + seed, "peak_mem_mb": 50.0 + seed,
        "provenance": {
            "train": {"git": {"commit": "abc1234", "dirty": run == "ntk_full_z"}},
            "evaluate": {"git": {"commit": "abc1234", "dirty": False}},
        },
    }
    if value == "failed":
        result.update(status="failed", value=None)
    result.update(changes or {})
    path.write_text(json.dumps(result))
    return path


@pytest.fixture
def study(tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(make_params(), sort_keys=False))
    results = tmp_path / "results"
    for (task, run), values in VALUES.items():
        for seed, value in enumerate(values):
            if value is not None:
                write_result(results, task, run, seed, value)
    argv = ["--params", str(params_path), "--results", str(results), "--out", str(results / "ablation_table.csv")]
    return results, argv


def read_table(results):
    with open(results / "ablation_table.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_rows_order_and_settings():
    rows = run_rows(validate(make_params()))
    assert [row.name for row in rows] == ["frozen", "ntk", "ntk_no_k", "ntk_full_z", "ntk_r32_s4", "ntk_r128_s4"]
    assert rows[-1].grid_point == (128, 4)
    assert rows[-1].tasks == ("lm",)
    assert rows[1].has_method_overrides is False
    assert rows[2].method_cfg["use_k"] is False


def test_aggregate_table_values(study, capsys):
    results, argv = study
    assert main(argv) == 0
    rows = read_table(results)
    assert [row["run"] for row in rows] == ["frozen", "ntk", "ntk_no_k", "ntk_full_z", "ntk_r32_s4", "ntk_r128_s4"]
    by_run = {row["run"]: row for row in rows}

    ntk = by_run["ntk"]
    assert float(ntk["lm_perplexity_mean"]) == pytest.approx(11.0)
    # Two values 2 apart: s = sqrt(2), half width = t * s / sqrt(2) = t.
    assert float(ntk["lm_perplexity_ci95"]) == pytest.approx(T_975_DF1, rel=1e-5)
    assert float(ntk["qa_accuracy_mean"]) == pytest.approx(0.75)
    assert float(ntk["qa_accuracy_ci95"]) == pytest.approx(T_975_DF1 * 0.05, rel=1e-5)
    assert ntk["lm_n_seeds"] == "2"
    assert ntk["missing"] == ""

    # A failed seed and a missing seed stay out of the means.
    no_k = by_run["ntk_no_k"]
    assert float(no_k["qa_accuracy_mean"]) == pytest.approx(0.60)
    assert no_k["qa_accuracy_ci95"] == ""
    assert no_k["qa_n_seeds"] == "1"
    assert no_k["missing"] == "qa seed 1 (status failed)"
    full_z = by_run["ntk_full_z"]
    assert float(full_z["lm_perplexity_mean"]) == pytest.approx(9.0)
    assert full_z["missing"] == "lm seed 1 (missing)"

    # Deltas against the full NTK-Attention run, only for its two ablations.
    assert float(no_k["lm_delta_vs_ntk"]) == pytest.approx(15.0 - 11.0)
    assert float(no_k["qa_delta_vs_ntk"]) == pytest.approx(0.60 - 0.75)
    assert float(full_z["lm_delta_vs_ntk"]) == pytest.approx(9.0 - 11.0)
    assert float(full_z["qa_delta_vs_ntk"]) == pytest.approx(0.80 - 0.75)
    for run in ("frozen", "ntk", "ntk_r32_s4"):
        assert by_run[run]["lm_delta_vs_ntk"] == ""

    # Parameter share is relative to the base model (total minus adapter parameters).
    assert float(ntk["trainable_share_pct"]) == pytest.approx(10.0)
    assert float(by_run["frozen"]["trainable_share_pct"]) == 0.0
    assert float(ntk["train_time_s_mean"]) == pytest.approx(2.5)
    assert float(ntk["peak_mem_mb_max"]) == pytest.approx(51.0)

    # Grid rows cover lm only and leave the qa cells empty.
    grid_row = by_run["ntk_r128_s4"]
    assert float(grid_row["lm_perplexity_mean"]) == pytest.approx(18.0)
    assert float(grid_row["lm_perplexity_ci95"]) == 0.0
    assert grid_row["qa_accuracy_mean"] == ""
    assert grid_row["qa_n_seeds"] == ""

    stderr = capsys.readouterr().err
    assert "ntk_no_k qa seed 1: status failed" in stderr
    assert "ntk_full_z lm seed 1: missing" in stderr


def test_aggregate_markdown_and_plot(study):
    results, argv = study
    assert main(argv) == 0
    markdown = (results / "ablation_table.md").read_text()
    assert markdown.startswith("# NTK-Attention ablation study: unit_test")
    assert "Git commit(s): abc1234." in markdown
    assert "From a dirty or unknown git tree: yes, 3 result(s)" in markdown
    assert "perplexity, lower is better" in markdown
    assert "accuracy, higher is better" in markdown
    assert "**Warning:** 2 result(s) missing or failed" in markdown
    assert "| ntk | ntk | 11 ± 12.7 (2) |" in markdown
    assert (results / "ablation_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(results.glob(".*.tmp"))


def test_aggregate_exclude_dirty(study):
    results, argv = study
    assert main(argv + ["--exclude-dirty"]) == 0
    full_z = {row["run"]: row for row in read_table(results)}["ntk_full_z"]
    assert full_z["lm_n_seeds"] == "0"
    assert "lm seed 0 (dirty tree)" in full_z["missing"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seed": 1}, "seed is 1, expected 0"),
        ({"metric": "accuracy"}, "metric is 'accuracy', expected 'perplexity'"),
        ({"value": "12.0"}, "value has type str"),
        ({"method": "lora"}, "method is 'lora'"),
    ],
)
def test_aggregate_malformed_writes_nothing(study, capsys, changes, message):
    results, argv = study
    bad = write_result(results, "lm", "ntk", 0, 10.0, changes)
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert str(bad) in stderr
    assert message in stderr
    assert not (results / "ablation_table.csv").exists()
    assert not (results / "ablation_table.md").exists()
    assert not (results / "ablation_plot.png").exists()


def test_aggregate_invalid_json_names_file(study, capsys):
    results, argv = study
    bad = results / "qa" / "frozen" / "seed1.json"
    bad.write_text("{not json")
    assert main(argv) == 2
    assert f"{bad}: cannot read JSON" in capsys.readouterr().err
    assert not (results / "ablation_table.csv").exists()


def test_aggregate_module_entry_point(study):
    results, argv = study
    done = subprocess.run([sys.executable, "-m", "ntkattn.study.aggregate", *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(read_table(results)) == 6
    assert not math.isnan(float(read_table(results)[1]["lm_perplexity_mean"]))


def test_aggregate_invalid_params_writes_nothing(study, capsys):
    results, argv = study
    params_path = Path(argv[1])
    params_path.write_text(params_path.read_text().replace("seeds:", "seedz:"))
    assert main(argv) == 2
    assert "params.yaml is invalid" in capsys.readouterr().err
    assert not (results / "ablation_table.csv").exists()
