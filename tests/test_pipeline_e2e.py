"""The smoke study end to end through Snakemake and `dvc repro`, in a temporary copy.

The copy is a fresh git repository with one commit, as a user's clone would be. Snakemake builds
the whole DAG; then each tool must agree that everything is up to date, and after a param edit
each tool must rerun exactly the stages that depend on the edited key, never more and never fewer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMOKE_RUNS = ["frozen", "full", "lora", "prefix", "ntk", "ntk_no_k", "ntk_full_z", "ntk_r8_s2"]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false")
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def make_copy(dest: Path, study: str = "smoke") -> Path:
    """Copy tracked and untracked-but-not-ignored files into a new one-commit git repository."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file() and not name.startswith(("results/", "dvc.lock")):
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    run([sys.executable, "-m", "ntkattn", "use-study", study], dest)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "smoke copy"], dest)
    return dest


def set_param(root: Path, run_name: str, lr: float) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["runs"][run_name].setdefault("train", {})["lr"] = lr
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def snakemake_jobs(output: str) -> list[str]:
    """Rule names Snakemake plans to run, read from its job table."""
    jobs, in_table = [], False
    for line in output.splitlines():
        if line.startswith("job") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if not parts or parts[0] == "total":
                break
            if not set(parts[0]) <= {"-"}:
                jobs.append(parts[0])
    return jobs


def dvc_ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = make_copy(tmp_path_factory.mktemp("e2e"))
    run(["snakemake", "--cores", "2", "results/ablation_table.csv"], root)
    return root


def test_snakemake_builds_table(built):
    table = pd.read_csv(built / "results" / "ablation_table.csv")
    assert list(table["run"]) == SMOKE_RUNS
    for column in ("lm_perplexity_mean", "qa_accuracy_mean", "trainable_params", "trainable_share_pct",
                   "train_time_s_mean", "peak_mem_mb_max", "lm_delta_vs_ntk", "qa_delta_vs_ntk"):
        assert column in table.columns, column
    assert table.loc[table["run"] == "frozen", "trainable_params"].item() == 0
    assert (table.loc[table["run"] != "frozen", "trainable_params"] > 0).all()
    assert table["lm_perplexity_mean"].notna().all()
    assert table["lm_perplexity_mean"].gt(1).all()
    text_runs = table["run"] != "ntk_r8_s2"  # the grid is declared on the lm task only
    assert table.loc[text_runs, "qa_accuracy_mean"].between(0, 1).all()
    assert (built / "results" / "ablation_table.md").exists()
    assert (built / "results" / "ablation_plot.png").stat().st_size > 0
    assert (built / "dvc.lock").exists()


def test_both_tools_see_nothing_to_do(built):
    again = run(["snakemake", "--cores", "1", "-n", "results/ablation_table.csv"], built)
    assert snakemake_jobs(again.stdout + again.stderr) == []
    repro = run(["dvc", "repro"], built)
    assert dvc_ran(repro.stdout) == []


def test_dvc_repro_reruns_only_edited_run(built):
    set_param(built, "lora", 0.002)
    repro = run(["dvc", "repro"], built)
    ran = dvc_ran(repro.stdout)
    assert sorted(ran) == ["aggregate", "evaluate@lm-lora-0", "evaluate@qa-lora-0",
                           "train@lm-lora-0", "train@qa-lora-0"]
    plan = run(["snakemake", "--cores", "1", "-n", "results/ablation_table.csv"], built)
    assert snakemake_jobs(plan.stdout + plan.stderr) == []


def test_snakemake_reruns_only_edited_run(built):
    set_param(built, "prefix", 0.02)
    plan = run(["snakemake", "--cores", "1", "-n", "results/ablation_table.csv"], built)
    planned = sorted(snakemake_jobs(plan.stdout + plan.stderr))
    assert planned == [
        "aggregate", "evaluate_lm_prefix_0", "evaluate_qa_prefix_0", "train_lm_prefix_0", "train_qa_prefix_0"
    ], plan.stdout[-3000:] + plan.stderr[-3000:]
    run(["snakemake", "--cores", "2", "results/ablation_table.csv"], built)
    assert dvc_ran(run(["dvc", "repro"], built).stdout) == []
    summary = json.loads((built / "results" / "runs" / "lm" / "prefix" / "seed0.json").read_text())
    assert summary["config"]["train"]["lr"] == 0.02


def test_dvc_experiment_compares_params(built):
    run(["git", "add", "-A"], built)
    run(["git", "commit", "-qm", "edited lrs"], built)
    run(["dvc", "exp", "run", "-S", "runs.ntk.train.lr=0.005", "-n", "ntk-lr"], built)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], built).stdout)
    text = json.dumps(shown)
    assert "ntk-lr" in text
    assert "0.005" in text
    assert "results/metrics.json" in text
