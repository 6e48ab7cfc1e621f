"""Processes that write the same result or table files at once never leave a partial file.

Snakemake and `dvc repro` run jobs side by side, and a user may rerun aggregate while another
one runs. Writers here are forked processes hammering the same paths while the test reads them.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import time
from pathlib import Path

from conftest import copy_workspace

from ntkattn.study import aggregate, provenance

FORK = multiprocessing.get_context("fork")
WRITERS = 6
WRITES = 60


def payload(writer: int, index: int) -> dict:
    # About 40 kB, so a torn write would be caught mid-file rather than fit in one block.
    return {"writer": writer, "index": index, "values": [writer * 1000 + index] * 5000}


def write_many_json(path: Path, writer: int, start) -> None:
    start.wait()
    for index in range(WRITES):
        provenance.write_json_atomic(path, payload(writer, index))


def table_text(writer: int, index: int) -> str:
    return "run,value\n" + "".join(f"r{i},{writer}.{index}\n" for i in range(2000))


def write_many_tables(folder: Path, writer: int, start) -> None:
    start.wait()
    for index in range(WRITES):
        text = table_text(writer, index)
        aggregate.write_outputs({folder / "table.csv": text, folder / "table.md": text}, None, [])


def run_writers(target, path: Path, reader) -> list[int]:
    """Start WRITERS processes on `path`, call `reader()` until they end; return their exit codes."""
    start = FORK.Event()
    processes = [FORK.Process(target=target, args=(path, writer, start)) for writer in range(WRITERS)]
    for process in processes:
        process.start()
    start.set()
    reads = 0
    while any(process.is_alive() for process in processes):
        reads += reader()
        time.sleep(0.001)
    for process in processes:
        process.join()
    assert reads > 0, "the reader never saw a file while writers ran"
    return [process.exitcode for process in processes]


def test_json_atomic_under_contention(tmp_path):
    path = tmp_path / "results" / "seed0.json"
    provenance.write_json_atomic(path, payload(-1, -1))

    def read_once() -> int:
        data = json.loads(path.read_text())  # a torn file raises here
        assert data["values"] == [data["writer"] * 1000 + data["index"]] * 5000
        return 1

    codes = run_writers(write_many_json, path, read_once)

    assert codes == [0] * WRITERS
    final = json.loads(path.read_text())
    assert final["index"] == WRITES - 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["seed0.json"]


def test_table_writes_under_contention(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    valid = {table_text(w, i) for w in range(WRITERS) for i in range(WRITES)}

    def read_once() -> int:
        seen = 0
        for name in ("table.csv", "table.md"):
            path = folder / name
            if path.exists():
                assert path.read_text() in valid, f"{name} holds a torn or mixed write"
                seen += 1
        return seen

    codes = run_writers(write_many_tables, folder, read_once)

    assert codes == [0] * WRITERS, "a writer crashed (another writer moved its temporary file)"
    assert read_once() == 2
    assert sorted(p.name for p in folder.iterdir()) == ["table.csv", "table.md"]


def aggregate_in_child(argv: list[str]) -> None:
    raise SystemExit(aggregate.main(argv))


def test_two_aggregates_at_once(finished_workspace, tmp_path):
    space = copy_workspace(finished_workspace, tmp_path / "ws")
    table = space.root / "results" / "ablation_table.csv"
    argv = ["--params", str(space.params), "--results", str(space.root / "results" / "runs"), "--out", str(table),
            "--metrics", str(space.root / "results" / "metrics.json")]

    processes = [FORK.Process(target=aggregate_in_child, args=(argv,)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)

    assert [process.exitcode for process in processes] == [0, 0]
    rows = list(csv.DictReader(table.open()))
    assert [row["run"] for row in rows] == ["frozen", "full", "lora"]
    assert all(row["lm_n_seeds"] == "1" for row in rows)
    assert json.loads((space.root / "results" / "metrics.json").read_text()).keys() == {"frozen", "full", "lora"}
    assert (space.root / "results" / "ablation_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((space.root / "results").glob(".*tmp*"))


def test_dvc_lock_serialises_lockfile(tmp_path):
    """Two `dvc repro --single-item` at once both run, and dvc.lock records both stages.

    DVC holds .dvc/tmp/lock while it reads the pipeline and writes dvc.lock, and releases it while
    a stage's command runs; --wait-for-lock makes the second process wait for it instead of failing.
    """
    import subprocess
    import sys

    import yaml
    from conftest import cli_env

    dvc = [sys.executable, "-m", "dvc"]
    env = cli_env()
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    stages = {name: {"cmd": f"sleep 1 && echo {name} > {name}.txt", "outs": [f"{name}.txt"]} for name in ("a", "b")}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))

    jobs = [subprocess.Popen([*dvc, "--wait-for-lock", "repro", "--single-item", name], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in stages]
    outputs = [job.communicate(timeout=120)[0] for job in jobs]

    assert [job.returncode for job in jobs] == [0, 0], outputs
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b"}
    assert (tmp_path / "a.txt").read_text() == "a\n"
