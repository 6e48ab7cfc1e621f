"""Read DVC's resolved pipeline so the Snakefile can mirror it rule for rule.

dvc.yaml is the only declaration of the DAG and dvc.lock the only record of what is up to date.
Snakemake runs each stage as `dvc repro --single-item <stage>`. This module returns which stages
exist, what each one writes, which stages feed it, and which ones DVC considers stale (changed
themselves, or downstream of a changed stage). Stale stages get a freshly touched sentinel file as
an extra input so Snakemake reruns them even when their outputs look newer than their inputs.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Inside DVC's own scratch folder, which git and DVC already ignore.
SENTINEL_DIR = Path(".dvc") / "tmp" / "snakemake-stale"
RESOURCES_FILE = Path("workflow") / "resources.yaml"
# Keys the Snakefile turns into rule threads and resources (names as the SLURM executor reads them).
RESOURCE_KEYS = {"threads", "mem_mb", "runtime", "gpu", "slurm_partition", "slurm_extra"}


@dataclass
class StageInfo:
    name: str
    outs: list[str]
    out_is_dir: list[bool]
    upstream: list[str] = field(default_factory=list)
    stale: bool = False

    @property
    def rule_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_]", "_", self.name)

    @property
    def group(self) -> str:
        """Stage name without the foreach/matrix suffix: `train@lm-ntk-0` -> `train`."""
        return self.name.split("@", 1)[0]


def _is_dir(out) -> bool:
    path = Path(out.fs_path)
    if path.exists():
        return path.is_dir()
    return not path.suffix


def read_stages(root: str | os.PathLike = ".", with_status: bool = True) -> list[StageInfo]:
    """Return every stage of the DVC pipeline in topological order."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        index = repo.index
        graph = index.graph  # edges point from a stage to the stages it depends on
        stages = {stage.addressing: stage for stage in index.stages}
        changed = set()
        if with_status:
            for name, _ in repo.status().items():
                changed.add(name.split(":")[-1])
        infos = {}
        for name, stage in stages.items():
            outs = [os.path.relpath(o.fs_path, str(Path(root).resolve())) for o in stage.outs]
            infos[name] = StageInfo(name=name, outs=outs, out_is_dir=[_is_dir(o) for o in stage.outs])
        for stage in stages.values():
            infos[stage.addressing].upstream = sorted(s.addressing for s in graph.successors(stage))
        order = [s.addressing for s in reversed(list(nx.topological_sort(graph)))]

    stale = set()
    for name in order:  # upstream first, so staleness flows downstream in one pass
        info = infos[name]
        if name in changed or any(up in stale for up in info.upstream):
            stale.add(name)
            info.stale = True
    return [infos[name] for name in order]


def touch_sentinel(stage: StageInfo, root: str | os.PathLike = ".") -> str:
    """Rewrite the stage's sentinel with new content and return its path."""
    path = Path(root) / SENTINEL_DIR / f"{stage.rule_name}.stale"
    path.parent.mkdir(parents=True, exist_ok=True)
    # New content each time, not only a new mtime: Snakemake 9.27 counts a newer input as updated
    # only when its checksum differs from the one recorded at the last run, so touching an empty
    # file never reran a stage that had run before.
    path.write_text(f"{stage.name} stale at {time.time_ns()}\n")
    return str(path.relative_to(root)) if Path(root) != Path(".") else str(path)


def load_resources(study: str, root: str | os.PathLike = ".") -> dict[str, dict]:
    """Per stage group cluster resources: the `default` block, overridden by `studies.<study>`."""
    path = Path(root) / RESOURCES_FILE
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    merged = {group: dict(values) for group, values in (data.get("default") or {}).items()}
    for group, values in ((data.get("studies") or {}).get(study) or {}).items():
        merged.setdefault(group, {}).update(values)

    # A misspelt key (`gpus`, `mem`) would silently submit a CPU job or the default memory.
    for group, values in merged.items():
        unknown = sorted(set(values) - RESOURCE_KEYS)
        if unknown:
            raise ValueError(f"{path}: stage group {group!r} has unknown resource keys {unknown}; "
                             f"allowed: {sorted(RESOURCE_KEYS)}")
    return merged
