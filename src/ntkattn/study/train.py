"""The one training loop: every method and task of the study fine-tunes here.

    accelerate launch --config_file workflow/accelerate/cpu.yaml -m ntkattn train \
        --task lm --run ntk --seed 0 --data data/lm --model models/base --out runs/lm/ntk/seed0

AdamW with warm-up then decay, gradient accumulation, optional bf16 and gradient checkpointing,
validation every `eval_every` steps with the best step kept (validation split only; the test
split is never read here), dvclive metrics and a resumable state: a killed run restarts from its
last validation point and ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ntkattn.study import provenance
from ntkattn.study.config import ConfigError, RunSpec, load_study
from ntkattn.study.methods import count_parameters, get_method
from ntkattn.study.tasks import batch_generator, build_task, load_task_model, pad_token_id

log = logging.getLogger("ntkattn.train")


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN or inf; the run stops and writes no metrics."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ntkattn train", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="study parameters file")
    parser.add_argument("--task", required=True, help="task name from params.yaml tasks")
    parser.add_argument("--run", required=True, help="run name from the run table or a grid point")
    parser.add_argument("--seed", required=True, type=int, help="seed from params.yaml seeds")
    parser.add_argument("--data", required=True, type=Path, help="prepared data folder of the task")
    parser.add_argument("--model", required=True, type=Path, help="prepared base model folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder of this run")
    parser.add_argument("--resume-dir", type=Path, default=Path(".cache/resume"), help="where resumable state lives")
    return parser.parse_args(argv)


def spec_digest(spec: RunSpec, study_model: dict) -> str:
    """Hash of everything that changes a run's numbers; resume state is only reused on a match."""
    payload = {"spec": [spec.task, spec.run, spec.seed, spec.method], "train": dict(spec.train),
               "method": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.method_cfg.items()},
               "model": study_model}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_launch_precision(requested: str) -> None:
    """Reject a run whose accelerate launch config requests another precision than params.yaml.

    Accelerator(mixed_precision=...) overrides the launch config, so without this check a bf16
    launch config would silently train in fp32 (or the reverse).
    """
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched == "no":
        launched = "fp32"
    if launched and launched != requested:
        raise ConfigError(
            f"the accelerate launch config sets mixed_precision={launched!r} but params.yaml has "
            f"train.mixed_precision={requested!r}; make them agree (set train.mixed_precision: {launched} "
            "or pick a launch config with the same precision in train.accelerate_config)"
        )


def make_scheduler(optimizer, train_cfg):
    from transformers import get_scheduler

    return get_scheduler(
        train_cfg["schedule"] if train_cfg["schedule"] != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=train_cfg["warmup_steps"],
        num_training_steps=train_cfg["steps"],
    )


def check_finite(loss: torch.Tensor, model, spec: RunSpec, step: int) -> None:
    where = f"run {spec.run!r}, task {spec.task!r}, seed {spec.seed}, step {step}"
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"loss is {loss.item()} at {where}; lower train.lr or enable max_grad_norm")
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            raise NonFiniteLossError(f"gradient of {name} is not finite at {where}; lower train.lr")


class ResumeState:
    """Trainable weights, optimizer, scheduler and bookkeeping saved at each validation point.

    The best checkpoint so far also lives here, not in the stage's output folder. `dvc repro`
    deletes a stage's outputs before it reruns it. Without this copy, a resumed run whose best
    step came before the interruption would end with no checkpoint at all.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.best_checkpoint = folder / "best_checkpoint"

    def save(self, model, optimizer, scheduler, info: dict) -> None:
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = {"trainable": trainable, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "info": info}
        tmp = self.folder / "state.pt.tmp"
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        tmp.replace(self.folder / "state.pt")

    def load(self, model, optimizer, scheduler) -> dict | None:
        path = self.folder / "state.pt"
        if not path.exists():
            return None
        try:
            state = torch.load(path, weights_only=True)
        except Exception as exc:  # a truncated file from a kill during an old save: start over
            log.warning("resume state %s is unreadable (%s); starting from step 0", path, exc)
            return None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return state["info"]

    def install_best(self, dest: Path) -> None:
        """Move the best checkpoint to `dest`, replacing what is there."""
        if not (self.best_checkpoint / "method.json").is_file():
            raise FileNotFoundError(f"best checkpoint {self.best_checkpoint} is missing or incomplete; rerun the training stage")
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        shutil.move(str(self.best_checkpoint), str(dest))
        shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def train(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    study = load_study(args.params)
    spec = study.resolve(args.task, args.run, args.seed)
    cfg = spec.train
    method = get_method(spec.method)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])

    check_launch_precision(cfg["mixed_precision"])
    # params.yaml names full precision fp32, accelerate names it "no" (a bare `no` in YAML is false).
    precision = "no" if cfg["mixed_precision"] == "fp32" else cfg["mixed_precision"]
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg["grad_accum"])
    set_seed(spec.seed, deterministic=False)
    started = time.time()

    model, tokenizer = load_task_model(args.model, study.model["dtype"], study.tasks[spec.task], args.data, spec.seed)
    pad_id = pad_token_id(tokenizer)
    task = build_task(study.tasks[spec.task]["kind"], args.data, study.tasks[spec.task], pad_id)
    model = method.apply(model, spec.method_cfg, spec.seed)
    if cfg["gradient_checkpointing"] and method.trains:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    accelerator.print(f"[{spec.task}/{spec.run}/seed{spec.seed}] method={spec.method} "
                      f"trainable={trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # A summary left by an earlier run would vouch for the checkpoint this run is about to replace;
    # remove it, so a run that fails from here on leaves no train.json and evaluate refuses it.
    (out / "train.json").unlink(missing_ok=True)
    steps = cfg["steps"] if method.trains else 0
    history, best = [], None
    start_step = 0
    resume = ResumeState(args.resume_dir / f"{spec.task}-{spec.run}-seed{spec.seed}-{spec_digest(spec, study.raw['model'])}")

    if steps:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        scheduler = make_scheduler(optimizer, cfg)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        info = resume.load(accelerator.unwrap_model(model), optimizer, scheduler)
        if info:
            start_step, history, best = info["step"], info["history"], info["best"]
            started -= info.get("train_time_s", 0.0)  # count the time spent before the interruption
            accelerator.print(f"resuming from step {start_step} ({resume.folder})")
    else:
        model = accelerator.prepare(model)

    # Runs that train keep their best checkpoint with the resume state until the end (see ResumeState).
    best_dir = resume.best_checkpoint if steps else out / "checkpoint"
    live = _open_live(out, accelerator, resume_step=start_step)
    _replay_history(live, history)
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=f"{spec.run}/{spec.task}/s{spec.seed}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    for step in bar:
        total_loss = 0.0
        for micro in range(cfg["grad_accum"]):
            gen = batch_generator(spec.seed, step * cfg["grad_accum"] + micro, accelerator.process_index)
            batch = {k: v.to(accelerator.device) for k, v in task.train_batch(gen, cfg["batch_size"]).items()}
            with accelerator.accumulate(model), accelerator.autocast():
                loss = task.loss(model, batch)
                accelerator.backward(loss)
                check_finite(loss.detach(), model, spec, step + 1)
                if accelerator.sync_gradients and cfg["max_grad_norm"]:
                    accelerator.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            total_loss += loss.item() / cfg["grad_accum"]
        bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        _log(live, {"train/loss": total_loss, "train/lr": scheduler.get_last_lr()[0]}, step + 1)

        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            best, history = _validate(model, task, method, accelerator, best_dir, live, spec, step + 1, best, history)
            resume.save(accelerator.unwrap_model(model), optimizer, scheduler,
                        {"step": step + 1, "history": history, "best": best, "train_time_s": time.time() - started})

    if steps == 0:
        best, history = _validate(model, task, method, accelerator, best_dir, live, spec, 0, best, history)
    if live is not None:
        live.end()

    summary = {
        "task": spec.task, "run": spec.run, "seed": spec.seed, "method": spec.method, "status": "ok",
        "steps": steps, "best_step": best["step"], "best_validation": best["value"], "metric": task.metric,
        "validation_history": history, "trainable_params": trainable, "total_params": total,
        "train_time_s": time.time() - started, "peak_mem_mb": provenance.peak_memory_mb(),
        "config": {"train": dict(cfg), "method": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in spec.method_cfg.items()}},
        "provenance": provenance.collect({"num_processes": accelerator.num_processes}),
    }
    if accelerator.is_main_process:
        if steps:
            resume.install_best(out / "checkpoint")
        provenance.write_json_atomic(out / "train.json", summary)
        resume.clear()
    return summary


def _validate(model, task, method, accelerator, checkpoint_dir, live, spec, step, best, history):
    """Score the validation split; save the model to `checkpoint_dir` when it is the best so far."""
    result = task.score(accelerator.unwrap_model(model), "validation")
    value = float(result["value"])
    if not math.isfinite(value):
        raise NonFiniteLossError(f"validation {task.metric} is {value} at run {spec.run!r}, seed {spec.seed}, step {step}")
    history = history + [{"step": step, task.metric: value}]
    _log(live, {f"val/{task.metric}": value}, step)
    improved = best is None or (value > best["value"] if task.higher_is_better else value < best["value"])
    if improved:
        best = {"step": step, "value": value}
        if accelerator.is_main_process:
            method.save(accelerator.unwrap_model(model), checkpoint_dir)
    accelerator.print(f"step {step}: validation {task.metric} = {value:.4f} (best {best['value']:.4f} at step {best['step']})")
    return best, history


def _open_live(out: Path, accelerator, resume_step: int):
    if not accelerator.is_main_process:
        return None
    try:
        from dvclive import Live
    except ImportError:
        return None
    # dvcyaml=None and save_dvc_exp=False: parallel jobs must not edit dvc.yaml or create experiments.
    return Live(str(out / "live"), dvcyaml=None, save_dvc_exp=False, report=None, resume=False)


def _replay_history(live, history) -> None:
    for entry in history:
        metric = next(k for k in entry if k != "step")
        _log(live, {f"val/{metric}": entry[metric]}, entry["step"])


def _log(live, values: dict, step: int) -> None:
    if live is None:
        return
    live.step = step
    for key, value in values.items():
        live.log_metric(key, value)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        train(args)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
