"""Sharing built stages through a DVC remote: push from one clone, pull into a fresh one.

A local folder replaces S3 or SSH here: DVC pushes and pulls the same way over every remote kind,
only the filesystem underneath differs. The pulled clone must see every stage as up to date, so it
would rerun nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from test_cluster_profiles import make_cluster_copy, run

pytestmark = pytest.mark.slow


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def keep_prepare_stages(root: Path) -> None:
    """Cut dvc.yaml to the two prepare stages: a whole pipeline, built in seconds."""
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in ("prepare_model", "prepare_data")}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))


def test_push_then_pull_into_fresh_clone(tmp_path):
    origin = make_cluster_copy(tmp_path / "origin")
    keep_prepare_stages(origin)
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], origin)
    run(["dvc", "repro", "prepare_model", "prepare_data"], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "prepare stages and remote"], origin)
    run(["dvc", "push"], origin)
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the remote"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "models" / "base").exists()
    # Links instead of copies: the workspace and the cache share one copy of each file.
    run(["dvc", "config", "--local", "cache.type", "hardlink,symlink"], clone)
    run(["dvc", "pull"], clone)

    status = run(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
    assert "changed" not in status, status
    assert "in sync" in run(["dvc", "status", "--cloud"], clone).stdout
    for out in ("models/base", "data/lm"):
        assert digest_tree(clone / out) == digest_tree(origin / out), out
    weights = next((clone / "models" / "base").glob("*.safetensors"))
    assert weights.stat().st_nlink > 1, "cache.type hardlink did not link the pulled file"
