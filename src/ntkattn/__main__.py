"""Command-line entry point: `python -m ntkattn <command> [options]`.

Every pipeline stage calls one of these commands, so a stage can also be run and debugged by hand.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "check": ("ntkattn.study.cli", "check_main", "validate params.yaml and print the runs it schedules"),
    "use-study": ("ntkattn.study.cli", "use_study_main", "copy a study preset from studies/ into params.yaml"),
    "fetch-assets": ("ntkattn.study.assets", "fetch_main", "download the BIG-bench archive if params.yaml reads it"),
    "prepare-model": ("ntkattn.study.base_model", "main", "build the base model folder (safetensors)"),
    "prepare-data": ("ntkattn.study.data", "main", "tokenise a task's splits into a data folder"),
    "train": ("ntkattn.study.train", "main", "fine-tune one run and seed on one task"),
    "evaluate": ("ntkattn.study.evaluate", "main", "score a fine-tuned run on the test split"),
    "aggregate": ("ntkattn.study.aggregate", "main", "build the ablation table from the result files"),
}


def usage() -> str:
    lines = ["usage: python -m ntkattn <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module_name), function)
    try:
        return entry(rest) or 0
    except Exception as exc:
        # The project's own error classes carry a message that names the value and the fix; print
        # it without a traceback. Anything else is a bug and keeps its traceback.
        if not type(exc).__module__.startswith("ntkattn"):
            raise
        from ntkattn.study.provenance import redact

        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
