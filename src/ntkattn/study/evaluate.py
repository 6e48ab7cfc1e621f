"""Score one fine-tuned run on the test split and write its result file.

    python -m ntkattn evaluate --task lm --run ntk --seed 0 --data data/lm --model models/base \
        --train-dir runs/lm/ntk/seed0 --out results/lm/ntk/seed0.json

The result file carries the test metric, the training summary (cost, trainable parameters, best
validation step) and the provenance of both stages. Only a run whose training ended with status
"ok" is scored; anything else raises before a result is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ntkattn.study import provenance
from ntkattn.study.config import load_study
from ntkattn.study.methods import get_method
from ntkattn.study.tasks import build_task, load_task_model, pad_token_id


class IncompleteRunError(RuntimeError):
    """The training stage of a run did not finish; there is nothing to evaluate."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ntkattn evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="study parameters file")
    parser.add_argument("--task", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--data", required=True, type=Path, help="prepared data folder of the task")
    parser.add_argument("--model", required=True, type=Path, help="prepared base model folder")
    parser.add_argument("--train-dir", required=True, type=Path, help="output folder of the training stage")
    parser.add_argument("--out", required=True, type=Path, help="result JSON to write")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    study = load_study(args.params)
    spec = study.resolve(args.task, args.run, args.seed)
    if spec.train["threads"]:
        torch.set_num_threads(spec.train["threads"])

    summary_path = args.train_dir / "train.json"
    if not summary_path.exists():
        raise IncompleteRunError(f"{summary_path} not found: training of {spec.run!r} seed {spec.seed} did not finish")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IncompleteRunError(f"{summary_path} cannot be read ({exc}); rerun the training stage") from None
    if not isinstance(summary, dict) or summary.get("status") != "ok":
        status = summary.get("status") if isinstance(summary, dict) else None
        raise IncompleteRunError(f"{summary_path} has status {status!r}; rerun the training stage")

    started = time.time()
    model, tokenizer = load_task_model(args.model, study.model["dtype"], study.tasks[spec.task], args.data, spec.seed)
    pad_id = pad_token_id(tokenizer)
    task = build_task(study.tasks[spec.task]["kind"], args.data, study.tasks[spec.task], pad_id)
    model = get_method(spec.method).restore(model, args.train_dir / "checkpoint", spec.method_cfg)
    model.eval()
    scores = task.score(model, "test", progress=args.progress)

    result = {
        "task": spec.task, "run": spec.run, "seed": spec.seed, "method": spec.method, "status": "ok",
        "metric": task.metric, "value": float(scores["value"]), "test": scores,
        "best_step": summary["best_step"], "best_validation": summary["best_validation"],
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "train_time_s": summary["train_time_s"], "peak_mem_mb": summary["peak_mem_mb"],
        "eval_time_s": time.time() - started, "eval_peak_mem_mb": provenance.peak_memory_mb(),
        "config": summary["config"],
        "provenance": {"train": summary["provenance"], "evaluate": provenance.collect()},
    }
    provenance.write_json_atomic(args.out, result)
    print(f"[{spec.task}/{spec.run}/seed{spec.seed}] test {task.metric} = {result['value']:.4f}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        evaluate(args)
    except IncompleteRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
