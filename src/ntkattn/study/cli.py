"""Small study commands: validate params.yaml, and switch the study by copying a preset."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from ntkattn.study.config import ConfigError, check_datasets, load_study, validate

STUDIES_DIR = Path("studies")


def check_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntkattn check", description="Validate a params file.")
    parser.add_argument("--params", default="params.yaml", help="params file to validate")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing when the file is valid, and skip the data set check (about 3 s)")
    args = parser.parse_args(argv)
    study = load_study(args.params)
    if args.quiet:
        return 0
    check_datasets(study, args.params)
    jobs = study.expected_results()
    print(f"{args.params}: study {study.name!r} is valid")
    print(f"  tasks: {', '.join(study.tasks)}; seeds: {list(study.seeds)}")
    print(f"  runs: {', '.join(study.run_names())}")
    print(f"  fine-tuning jobs (task x run x seed): {len(jobs)}")
    return 0


def available_studies(root: Path = STUDIES_DIR) -> list[str]:
    return sorted(p.stem for p in root.glob("*.yaml"))


def use_study_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ntkattn use-study",
        description="Copy studies/NAME.yaml to params.yaml after validating it. dvc repro and snakemake "
        "both read params.yaml, so this one command switches the study for both.",
    )
    parser.add_argument("name", help="preset name: a file studies/NAME.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file to replace")
    parser.add_argument("--force", action="store_true", help="replace params.yaml even if it matches no preset")
    args = parser.parse_args(argv)

    source = STUDIES_DIR / f"{args.name}.yaml"
    if not source.is_file():
        raise ConfigError(f"study {args.name!r} not found in {STUDIES_DIR}/; available: {available_studies()}")
    validate(yaml.safe_load(source.read_text()), origin=str(source))

    target = Path(args.params)
    if target.exists() and not args.force:
        current = target.read_text()
        if not any(current == p.read_text() for p in STUDIES_DIR.glob("*.yaml")):
            # Edits that exist nowhere else would be lost, so keep a copy and print its path.
            backup = target.with_suffix(".yaml.bak")
            shutil.copyfile(target, backup)
            print(f"params.yaml matched no preset; saved it as {backup}", file=sys.stderr)
    shutil.copyfile(source, target)
    print(f"params.yaml is now study {args.name!r} (from {source})")
    return 0
