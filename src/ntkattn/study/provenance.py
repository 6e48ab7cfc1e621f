"""What a result needs to be traced and rerun: code state, packages, hardware, cost."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("ntkattn", "torch", "transformers", "peft", "accelerate", "datasets", "dvc", "dvclive", "snakemake", "pandas")

# Environment variables whose values must never reach a log or a result file.
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


def git_state(repo: str | os.PathLike = ".") -> dict[str, Any]:
    """Commit and dirty flag of the working tree; None where git or the repository is missing."""
    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def peak_memory_mb() -> float:
    """Peak accelerator memory if a GPU is used, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def collect(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    record = {"git": git_state(), "packages": package_versions(), "hardware": hardware()}
    record.update(extra or {})
    return record


def redact(text: str) -> str:
    """Replace the value of any secret-like environment variable found in `text`."""
    for name, value in os.environ.items():
        if value and len(value) >= 8 and any(marker in name.upper() for marker in SECRET_MARKERS):
            text = text.replace(value, f"<{name} redacted>")
    return text


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = redact(json.dumps(data, indent=2, sort_keys=False, default=str))
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file as 0600; give the result the permissions of a normal file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
