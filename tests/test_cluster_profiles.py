"""The cluster profiles, run against fake SLURM commands in temporary copies of the repository.

The fakes (sbatch, sacct, squeue, scancel, srun, sinfo) log their arguments and run each job on
this machine before sbatch returns, so a profile run builds real results. The study is the smoke
study cut to one task and two runs (frozen, ntk). A study override in workflow/resources.yaml
sends its train stages to a GPU partition. The prepare stages are built once with `dvc repro` and
shared, so each profile submits only the five train, evaluate and aggregate jobs.
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
RUNS = ["frozen", "ntk"]
TRAIN_OVERRIDE = {"gpu": 1, "slurm_partition": "gpu", "mem_mb": 3000, "runtime": 7}

FAKE_SLURM = r'''#!/usr/bin/env python3
"""Fake SLURM command, dispatched by its file name. Each call is logged to $FAKE_SLURM_DIR/calls.jsonl."""
import json, os, subprocess, sys
from pathlib import Path

STATE = Path(os.environ["FAKE_SLURM_DIR"])


def option(args, *names):
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def sbatch(args):
    jobs = STATE / "jobs"
    jobs.mkdir(exist_ok=True)
    number = 1000
    while True:  # submissions come from several threads: claim an id atomically
        try:
            os.close(os.open(jobs / str(number), os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            number += 1
    job_id = str(number)
    script = option(args, "--wrap")
    if script is None:
        script = sys.stdin.read() if args[-1] == "/dev/stdin" else Path(args[-1]).read_text()
    output = (option(args, "--output", "-o") or f"slurm-{job_id}.out").replace("%j", job_id)
    env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOBID=job_id)
    with open(output, "w") as out:  # the job runs to its end before sbatch returns
        done = subprocess.run(["sh", "-c", script], cwd=option(args, "-D", "--chdir"), env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    state = "COMPLETED" if done.returncode == 0 else "FAILED"
    (jobs / job_id).write_text(json.dumps({"name": option(args, "--job-name", "-J"), "state": state}))
    print(job_id)


def report(args):
    name, job_filter = option(args, "--name"), option(args, "-j", "--jobs")
    for path in sorted((STATE / "jobs").glob("*")):
        job = json.loads(path.read_text() or "{}")
        if job and (name is None or job["name"] == name) and (job_filter is None or path.name == job_filter):
            print(f"{path.name}|{job['state']}" if Path(sys.argv[0]).name == "sacct" else job["state"])


tool, args = Path(sys.argv[0]).name, sys.argv[1:]
with open(STATE / "calls.jsonl", "a") as fh:
    fh.write(json.dumps({"tool": tool, "args": args}) + "\n")
if tool == "sbatch":
    sbatch(args)
elif tool in ("sacct", "squeue") and ("--name" in args or "-j" in args):
    report(args)
elif tool == "sinfo":
    print("PARTITION\ncpu*\ngpu")
elif tool == "srun":
    while args and args[0].startswith("-"):
        args = args[1:]
    os.execvp(args[0], args)
'''


def env_for(fake_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    path = [str(Path(sys.executable).parent), env.get("PATH", "")]
    if fake_dir is not None:
        path.insert(0, str(fake_dir / "bin"))
        env["FAKE_SLURM_DIR"] = str(fake_dir)
    env["PATH"] = os.pathsep.join(path)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def run(cmd: list[str], cwd: Path, fake_dir: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env_for(fake_dir), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def make_cluster_copy(dest: Path) -> Path:
    """Copy the tracked and untracked-but-not-ignored files into a one-commit git repo, with the
    cut-down smoke study in params.yaml and a GPU override for its train stages."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        if (REPO / name).is_file() and not name.startswith(("results/", "dvc.lock")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)

    study = yaml.safe_load((REPO / "studies" / "smoke.yaml").read_text())
    study["tasks"] = {"lm": study["tasks"]["lm"]}
    study["runs"] = {name: study["runs"][name] for name in RUNS}
    study["grid"].update(r=[], s=[], tasks=[])
    (dest / "params.yaml").write_text(yaml.safe_dump(study, sort_keys=False))

    resources = yaml.safe_load((dest / "workflow" / "resources.yaml").read_text())
    smoke = resources.setdefault("studies", {}).setdefault("smoke", {})
    smoke["train"] = {**smoke.get("train", {}), **TRAIN_OVERRIDE}
    (dest / "workflow" / "resources.yaml").write_text(yaml.safe_dump(resources))

    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "cluster copy"]):
        run(cmd, dest)
    return dest


def make_fakes(fake_dir: Path) -> Path:
    (fake_dir / "bin").mkdir(parents=True)
    script = fake_dir / "fake_slurm.py"
    script.write_text(f"#!{sys.executable}\n" + FAKE_SLURM)
    script.chmod(0o755)
    for tool in ("sbatch", "sacct", "squeue", "scancel", "srun", "sinfo"):
        (fake_dir / "bin" / tool).symlink_to(script)
    return fake_dir


def sbatch_calls(fake_dir: Path) -> list[list[str]]:
    lines = (fake_dir / "calls.jsonl").read_text().splitlines()
    return [call["args"] for call in map(json.loads, lines) if call["tool"] == "sbatch"]


def check_table(root: Path) -> None:
    table = pd.read_csv(root / "results" / "ablation_table.csv")
    assert list(table["run"]) == RUNS
    for name in RUNS:
        result = json.loads((root / "results" / "runs" / "lm" / name / "seed0.json").read_text())
        row = table.loc[table["run"] == name]
        assert row["lm_perplexity_mean"].item() == pytest.approx(result["test"]["perplexity"])
    assert table.loc[table["run"] == "frozen", "trainable_params"].item() == 0
    assert table.loc[table["run"] == "ntk", "trainable_params"].item() > 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A copy whose prepare stages are built (and recorded in dvc.lock) by plain `dvc repro`."""
    root = make_cluster_copy(tmp_path_factory.mktemp("prepared"))
    run(["dvc", "repro", "prepare_model", "prepare_data"], root)
    return root


def test_slurm_profile_dry_run_needs_no_slurm(tmp_path):
    root = make_cluster_copy(tmp_path / "repo")
    done = run(["snakemake", "--profile", "profiles/slurm", "-n", "results/ablation_table.csv"], root)
    out = done.stdout + done.stderr
    assert "Using profiles profiles/slurm" in out
    for rule in ("prepare_model", "train_lm_ntk_0", "aggregate"):
        assert f"rule {rule}:" in out, rule
    # The study override reaches the train rules, and only them.
    assert "runtime=7, gpu=1, slurm_partition=gpu" in out
    assert "runtime=10, gpu=0, slurm_partition=," in out


def test_unknown_resource_key_is_an_error(tmp_path):
    from ntkattn.study.dvc_bridge import load_resources

    (tmp_path / "workflow").mkdir()
    (tmp_path / "workflow" / "resources.yaml").write_text("default:\n  train: {gpus: 1}\n")
    with pytest.raises(ValueError, match="gpus"):
        load_resources("smoke", root=tmp_path)


@pytest.mark.slow
def test_slurm_profile_submits_resources(prepared, tmp_path):
    root = shutil.copytree(prepared, tmp_path / "repo", symlinks=True)
    fakes = make_fakes(tmp_path / "fakes")
    run(["snakemake", "--profile", "profiles/slurm", "--jobs", "2", "--latency-wait", "5",
         "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
         "results/ablation_table.csv"], root, fakes)
    check_table(root)

    calls = {next(a for a in args if a.startswith("rule_")): " ".join(args) for args in sbatch_calls(fakes)}
    assert sorted(calls) == sorted(["rule_aggregate"] + [f"rule_{s}_lm_{r}_0" for s in ("train", "evaluate") for r in RUNS])
    for run_name in RUNS:
        train, evaluate = calls[f"rule_train_lm_{run_name}_0"], calls[f"rule_evaluate_lm_{run_name}_0"]
        for flag in ("-p gpu", "--gpus=1", "--mem 3000", "-t 7"):  # the study override
            assert flag in train, f"{flag} missing from: {train}"
        for flag in ("-p cpu", "--mem 2000", "-t 10", "--cpus-per-task=1"):  # smoke defaults, sinfo's default partition
            assert flag in evaluate, f"{flag} missing from: {evaluate}"
        assert "--gpus" not in evaluate, evaluate
    for flag in ("--mem 2000", "-t 10"):
        assert flag in calls["rule_aggregate"], f"{flag} missing from: {calls['rule_aggregate']}"


@pytest.mark.slow
def test_cluster_generic_profile_submits_resources(prepared, tmp_path):
    root = shutil.copytree(prepared, tmp_path / "repo", symlinks=True)
    fakes = make_fakes(tmp_path / "fakes")
    run(["snakemake", "--profile", "profiles/cluster-generic", "--jobs", "2", "--latency-wait", "5",
         "--seconds-between-status-checks", "1", "results/ablation_table.csv"], root, fakes)
    check_table(root)

    calls = {args[args.index("--job-name") + 1]: " ".join(args) for args in sbatch_calls(fakes)}
    assert sorted(calls) == sorted(["smk-aggregate"] + [f"smk-{s}_lm_{r}_0" for s in ("train", "evaluate") for r in RUNS])
    for run_name in RUNS:
        train, evaluate = calls[f"smk-train_lm_{run_name}_0"], calls[f"smk-evaluate_lm_{run_name}_0"]
        for flag in ("--partition gpu", "--gpus 1", "--mem 3000", "--time 7"):
            assert flag in train, f"{flag} missing from: {train}"
        for flag in ("--mem 2000", "--time 10", "--cpus-per-task 1"):
            assert flag in evaluate, f"{flag} missing from: {evaluate}"
        for flag in ("--partition", "--gpus"):  # empty partition and 0 GPUs leave the flags out
            assert flag not in evaluate, evaluate
    statuses = [c for c in map(json.loads, (fakes / "calls.jsonl").read_text().splitlines()) if c["tool"] == "sacct"]
    assert statuses, "the status script never asked sacct"


@pytest.mark.parametrize("name, distributed, precision, processes, cpu", [
    ("cpu", "NO", "no", 1, True),
    ("gpu1-bf16", "NO", "bf16", 1, False),
    ("multi-gpu", "MULTI_GPU", "bf16", 4, False),
])
def test_accelerate_config_parses(name, distributed, precision, processes, cpu):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "workflow" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == distributed
    assert config.mixed_precision == precision
    assert config.num_processes == processes
    assert config.use_cpu is cpu
