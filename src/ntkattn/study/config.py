"""Load and validate params.yaml into frozen objects.

params.yaml is the only home of the study's knobs. It is checked here once, before any stage does
work: first against the JSON Schema in schema.yaml (types, ranges, allowed names), then against
the cross-field rules that a schema cannot express. Every error names the key, the value and what
is allowed; an unknown key comes with the closest valid name.
"""

from __future__ import annotations

import copy
import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")

# Head dimension used to check s <= min(r, d) before a model is loaded (random models take it from
# model.tiny). The check is repeated with the real head dimension when NTK-Attention is injected.
KNOWN_HEAD_DIMS = {"smollm2-gguf": 64}
RANDOM_SOURCES = ("random-llama", "random-bert", "random-vit")


# Names other tools use for a key of params.yaml, so a typo of those names still gets a hint.
KEY_ALIASES = {
    "learning_rate": "lr",
    "num_steps": "steps",
    "max_steps": "steps",
    "epochs": "steps",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "warmup": "warmup_steps",
    "lr_scheduler": "schedule",
    "lr_scheduler_type": "schedule",
    "scheduler": "schedule",
    "precision": "mixed_precision",
    "bf16": "mixed_precision",
    "seed": "seeds",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "prefix_length": "num_virtual_tokens",
}


class ConfigError(ValueError):
    """params.yaml (or a study preset) is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning job: a task, a run of the run table and a seed, with settings resolved."""

    task: str
    run: str
    seed: int
    method: str
    train: Mapping[str, Any]
    method_cfg: Mapping[str, Any]

    @property
    def result_path(self) -> str:
        return f"results/runs/{self.task}/{self.run}/seed{self.seed}.json"

    @property
    def run_dir(self) -> str:
        return f"runs/{self.task}/{self.run}/seed{self.seed}"


@dataclass(frozen=True)
class Study:
    """A validated params.yaml. `raw` keeps the plain mapping for provenance records."""

    name: str
    model: Mapping[str, Any]
    tasks: Mapping[str, Mapping[str, Any]]
    train: Mapping[str, Any]
    methods: Mapping[str, Mapping[str, Any]]
    runs: Mapping[str, Mapping[str, Any]]
    grid: Mapping[str, Any]
    seeds: tuple[int, ...]
    raw: Mapping[str, Any] = field(repr=False)

    def run_names(self) -> list[str]:
        """Names of the run table's entries, then the grid points, in table order."""
        return list(self.runs) + [name for name, _ in self.grid_points()]

    def grid_points(self) -> list[tuple[str, dict]]:
        """Expand the r x s grid into (run name, NTK overrides) pairs."""
        points = []
        for r, s in itertools.product(self.grid["r"], self.grid["s"]):
            overrides = {"r": r, "s": s}
            if self.grid.get("feature_map"):
                overrides["feature_map"] = self.grid["feature_map"]
            points.append((f"{self.grid['base']}_r{r}_s{s}", overrides))
        return points

    def tasks_of(self, run: str) -> list[str]:
        if run in self.runs:
            return list(self.tasks)
        return list(self.grid["tasks"])

    def resolve(self, task: str, run: str, seed: int) -> RunSpec:
        """Merge shared defaults with a run's sparse overrides."""
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; tasks in params.yaml: {sorted(self.tasks)}")
        if seed not in self.seeds:
            raise ConfigError(f"seed {seed} is not in params.yaml seeds {list(self.seeds)}")
        grid = dict(self.grid_points())
        if run in self.runs:
            entry, extra = self.runs[run], {}
        elif run in grid:
            entry, extra = self.runs[self.grid["base"]], grid[run]
        else:
            raise ConfigError(f"unknown run {run!r}; runs: {self.run_names()}")
        if task not in self.tasks_of(run):
            raise ConfigError(f"run {run!r} is not scheduled on task {task!r}")
        method = entry["method"]
        train = {**self.train, **entry.get("train", {})}
        method_cfg = {**self.methods[method], **entry.get(method, {}), **extra}
        return RunSpec(task, run, seed, method, _freeze(train), _freeze(method_cfg))

    def expected_results(self) -> list[RunSpec]:
        """Resolve every (task, run, seed) job the study schedules, in table order."""
        return [
            self.resolve(task, run, seed)
            for run in self.run_names()
            for task in self.tasks_of(run)
            for seed in self.seeds
        ]


class FrozenMap(Mapping):
    """Read-only mapping whose keys also read as attributes (`task.block_size`)."""

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", MappingProxyType(dict(data)))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("FrozenMap is read-only")

    def __repr__(self) -> str:
        return f"FrozenMap({dict(self._data)!r})"

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, FrozenMap) else (list(v) if isinstance(v, tuple) else v)
                for k, v in self._data.items()}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenMap({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _load_schema() -> dict:
    with open(SCHEMA_PATH) as handle:
        return yaml.safe_load(handle)


def _allowed_keys(schema: dict, root: dict, path: tuple) -> list[str]:
    """Property names the schema allows at `path` (for 'did you mean' hints)."""
    node = schema
    for part in path:
        while "$ref" in node:
            node = root["$defs"][node["$ref"].split("/")[-1]]
        props = node.get("properties", {})
        node = props.get(part) or node.get("additionalProperties") or {}
    while "$ref" in node:
        node = root["$defs"][node["$ref"].split("/")[-1]]
    return list(node.get("properties", {}))


def _format_schema_error(error: jsonschema.ValidationError, schema: dict) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = _allowed_keys(schema, schema, tuple(error.absolute_path))
        unknown = sorted(set(error.instance) - set(allowed))
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            alias = KEY_ALIASES.get(key.lower().replace("-", "_"))
            if alias in allowed:
                close = [alias]
            elif not close:
                close = difflib.get_close_matches(key, list(KEY_ALIASES), n=1, cutoff=0.75)
                close = [KEY_ALIASES[close[0]]] if close and KEY_ALIASES[close[0]] in allowed else []
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {sorted(allowed)}"
            hints.append(f"unknown key {where}.{key} ({hint})".replace("<top level>.", ""))
        return "; ".join(hints)
    if error.validator == "enum":
        hint = ""
        if isinstance(error.instance, bool):
            hint = " (YAML reads a bare no/yes/off/on as a boolean; write one of the allowed names)"
        return f"{where} = {error.instance!r} is not allowed; choose one of {error.validator_value}{hint}"
    if error.validator == "pattern" and "propertyNames" in error.schema_path:
        return (
            f"name {error.instance!r} under {where} has characters that are not allowed "
            f"(must match {error.validator_value}: lower-case letters, digits and underscores, "
            "because names become file names and command arguments)"
        )
    if error.validator == "pattern":
        return (
            f"{where} = {error.instance!r} has characters that are not allowed "
            f"(must match {error.validator_value}: lower-case letters, digits and underscores "
            "for names, because they become file names and command arguments)"
        )
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where} = {error.instance!r}: {error.message}"


def _check_cross_fields(data: dict) -> list[str]:
    problems = []
    train = data["train"]
    for run, entry in data["runs"].items():
        for key in entry:
            if key in ("method", "train"):
                continue
            if key != entry["method"]:
                problems.append(
                    f"runs.{run}.{key}: overrides of {key!r} settings in a run of method "
                    f"{entry['method']!r}; rename the key to {entry['method']!r} or change the method"
                )
        merged_train = {**train, **entry.get("train", {})}
        if merged_train.get("eval_every", 1) > merged_train.get("steps", 1):
            problems.append(
                f"runs.{run}: train.eval_every = {merged_train['eval_every']} is longer than "
                f"train.steps = {merged_train['steps']}; validation would never run before the end"
            )
        if entry["method"] == "ntk":
            merged = {**data["methods"]["ntk"], **entry.get("ntk", {})}
            problems += _check_ntk(f"runs.{run}.ntk", merged, data["model"])
    grid = data["grid"]
    if grid["r"] or grid["s"] or grid["tasks"]:
        base = data["runs"].get(grid["base"])
        if base is None:
            problems.append(f"grid.base = {grid['base']!r} is not a run; runs: {sorted(data['runs'])}")
        elif base["method"] != "ntk":
            problems.append(f"grid.base = {grid['base']!r} must be an ntk run, not {base['method']!r}")
        for task in grid["tasks"]:
            if task not in data["tasks"]:
                problems.append(f"grid.tasks has {task!r}, which is not a task; tasks: {sorted(data['tasks'])}")
        if base is not None and base["method"] == "ntk":
            for r, s in itertools.product(grid["r"], grid["s"]):
                merged = {**data["methods"]["ntk"], **base.get("ntk", {}), "r": r, "s": s}
                if grid.get("feature_map"):
                    merged["feature_map"] = grid["feature_map"]
                problems += _check_ntk(f"grid point r={r}, s={s}", merged, data["model"])
        names = {f"{grid['base']}_r{r}_s{s}" for r, s in itertools.product(grid["r"], grid["s"])}
        for clash in sorted(names & set(data["runs"])):
            problems.append(f"grid point {clash!r} has the same name as a run; rename the run")
    for name, task in data["tasks"].items():
        if task.get("eval_stride", 0) > task.get("eval_context", 1 << 30):
            problems.append(
                f"tasks.{name}.eval_stride = {task['eval_stride']} exceeds eval_context = "
                f"{task['eval_context']}; tokens between windows would never be scored"
            )
    if data["model"]["source"] == "hub" and not data["model"].get("hub_id"):
        problems.append("model.source = 'hub' needs model.hub_id (for example meta-llama/Llama-3.1-8B-Instruct)")
    return problems


def _head_dim(model: dict) -> int | None:
    """Return the attention head dimension implied by `model:`, or None where only loading tells."""
    if model["source"] in KNOWN_HEAD_DIMS:
        return KNOWN_HEAD_DIMS[model["source"]]
    tiny = model.get("tiny")
    if model["source"] in RANDOM_SOURCES and tiny and tiny["hidden_size"] % tiny["heads"] == 0:
        return tiny["hidden_size"] // tiny["heads"]
    return None


def _check_ntk(where: str, cfg: dict, model: dict) -> list[str]:
    problems = []
    d = _head_dim(model)
    natural = {"elu": d, "taylor": None if d is None else d + 1}
    r = cfg.get("r")
    fmap = cfg.get("feature_map", "elu")
    if fmap == "random" and r is None:
        problems.append(f"{where}: feature_map 'random' needs an explicit r (the number of random features)")
    if fmap in natural and r is not None and natural[fmap] is not None and r != natural[fmap]:
        problems.append(
            f"{where}: feature_map {fmap!r} has width {natural[fmap]} for head dim {d}, but r = {r}; "
            "set r: null or use feature_map: random"
        )
    width = r if r is not None else natural.get(fmap)
    s = cfg.get("s")
    if cfg.get("z_rank", "low") == "low" and s is not None and width is not None:
        limit = min(width, d) if d is not None else width
        if s > limit:
            problems.append(f"{where}: s = {s} must be <= min(r, d) = {limit}")
    return problems


def validate(data: Any, origin: str = "params.yaml") -> Study:
    """Validate a parsed params mapping and return a Study; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of keys at the top level, got {type(data).__name__}")
    schema = _load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    problems = [_format_schema_error(e, schema) for e in errors]
    if not problems:
        problems = _check_cross_fields(data)
    if problems:
        listing = "\n  - ".join(problems)
        raise ConfigError(f"{origin} is invalid:\n  - {listing}")
    return Study(
        name=data["study"],
        model=_freeze(data["model"]),
        tasks=_freeze(data["tasks"]),
        train=_freeze(data["train"]),
        methods=_freeze(data["methods"]),
        runs=_freeze(data["runs"]),
        grid=_freeze(data["grid"]),
        seeds=tuple(data["seeds"]),
        raw=copy.deepcopy(data),
    )


def load_study(path: str | Path = "params.yaml") -> Study:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found; run from the repository root or pass --params")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return validate(data, origin=str(path))


def check_datasets(study: Study, origin: str = "params.yaml") -> None:
    """Check that each task names a known data set of its kind; raise ConfigError listing the problems.

    It is kept apart from `validate` because it imports the data modules (about 3 s of CPU), a
    cost the per-stage `check --quiet` skips. `check`, `run.sh study` and the Snakefile call it.
    """
    from types import SimpleNamespace

    from ntkattn.study import data, data_plugins

    known = sorted(set(data.DATASET_KINDS) | set(data_plugins.registered()))
    problems = []
    for name, cfg in study.tasks.items():
        try:
            data.check_task(name, SimpleNamespace(**dict(cfg)))
        except data.DataPrepError as error:
            message = str(error)
            close = difflib.get_close_matches(str(cfg.get("dataset")), known, n=1)
            if "is unknown" in message and close:
                message += f" Did you mean {close[0]!r}?"
            problems.append(message)
    if problems:
        listing = "\n  - ".join(problems)
        raise ConfigError(f"{origin} is invalid:\n  - {listing}")
