"""Collect the per-seed result files into the ablation table (CSV, Markdown) and a plot.

    python -m ntkattn.study.aggregate --params params.yaml --results results \
        --out results/ablation_table.csv

reads results/<task>/<run>/seed<seed>.json for every task x run x seed that params.yaml
expects and writes the CSV, a Markdown copy next to it (same name, .md) and
ablation_plot.png in the same folder (or the path given by --plot). Missing files and results whose status is not "ok" stay
out of the means and are listed in the `missing` column. A malformed file stops the run
before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ntkattn.study.config import ConfigError, Study, load_study
from ntkattn.study.metrics import mean_ci95

METRIC_BY_KIND = {"causal_lm": "perplexity", "yes_no": "accuracy", "image_classification": "accuracy", "math": "accuracy"}
LOWER_IS_BETTER = {"perplexity": True, "accuracy": False}
OK_KEYS = {
    "method": str, "metric": str, "value": (int, float), "trainable_params": int,
    "total_params": int, "train_time_s": (int, float), "peak_mem_mb": (int, float), "provenance": dict,
}


class ResultError(ValueError):
    """A result file that cannot be read or contradicts params.yaml."""


@dataclass(frozen=True)
class RunRow:
    """One row of the table: a run of the run table or a grid point, with its resolved settings."""

    name: str
    method: str
    tasks: tuple[str, ...]
    method_cfg: dict
    has_method_overrides: bool
    grid_point: tuple[int, int] | None = None  # (r, s) for sensitivity-grid runs


def run_rows(study: Study) -> list[RunRow]:
    """List the runs in table order: the run table, then the grid points."""
    grid_points = dict(study.grid_points())
    rows = []
    for name in study.run_names():
        tasks = tuple(study.tasks_of(name))
        resolved = study.resolve(tasks[0], name, study.seeds[0])
        point = grid_points.get(name)
        overridden = name in study.runs and bool(study.runs[name].get(resolved.method))
        rows.append(RunRow(
            name, resolved.method, tasks, dict(resolved.method_cfg), overridden,
            (point["r"], point["s"]) if point else None,
        ))
    return rows


def result_path(results_dir: Path, task: str, run: str, seed: int) -> Path:
    return results_dir / task / run / f"seed{seed}.json"


def _is_type(value, expected) -> bool:
    # bool is an int subclass in Python, but True is never a valid count or measurement.
    return isinstance(value, expected) and not isinstance(value, bool)


def load_result(path: Path, task: str, spec: RunRow, seed: int, metric: str) -> dict:
    """Read and check one result file; raise ResultError naming the file if it is malformed."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ResultError(f"{path}: cannot read JSON: {error}") from error
    if not isinstance(result, dict):
        raise ResultError(f"{path}: expected a JSON object, got {type(result).__name__}")

    identity = {"task": task, "run": spec.name, "seed": seed}
    for key, expected in identity.items():
        if result.get(key) != expected:
            raise ResultError(f"{path}: {key} is {result.get(key)!r}, expected {expected!r} from the file's path")
    if not isinstance(result.get("status"), str):
        raise ResultError(f"{path}: missing or non-string 'status'")
    if result["status"] != "ok":
        return result

    for key, expected in OK_KEYS.items():
        if key not in result:
            raise ResultError(f"{path}: missing key {key!r} in a result with status 'ok'")
        if not _is_type(result[key], expected):
            raise ResultError(f"{path}: {key} has type {type(result[key]).__name__}, which is invalid")
    if result["method"] != spec.method:
        raise ResultError(f"{path}: method is {result['method']!r}, but params.yaml runs {spec.name} with {spec.method!r}")
    if result["metric"] != metric:
        raise ResultError(f"{path}: metric is {result['metric']!r}, expected {metric!r} for task {task}")
    return result


def base_params(result: dict) -> int:
    """Parameters of the unmodified base model, for the trainable share.

    Uses `base_params` when the result has it. Otherwise adapters add parameters to the base,
    so base = total - trainable, except for full fine-tuning, where everything is trainable.
    """
    if "base_params" in result:
        return int(result["base_params"])
    if result["method"] == "full":
        return result["total_params"]
    return result["total_params"] - result["trainable_params"]


def metrics_by_task(study: Study) -> dict[str, str]:
    return {task: METRIC_BY_KIND[cfg["kind"]] for task, cfg in study.tasks.items()}


def collect(study: Study, results_dir: Path) -> tuple[dict, dict]:
    """Read every expected result: returns (ok results, problems) keyed by (task, run, seed).

    problems maps to "missing", "status <status>" or "non-finite value".
    """
    metric_of = metrics_by_task(study)
    rows = {row.name: row for row in run_rows(study)}
    ok, problems = {}, {}
    for expected in study.expected_results():
        key = (expected.task, expected.run, expected.seed)
        path = result_path(results_dir, *key)
        if not path.exists():
            problems[key] = "missing"
            continue
        result = load_result(path, expected.task, rows[expected.run], expected.seed, metric_of[expected.task])
        if result["status"] != "ok":
            problems[key] = f"status {result['status']}"
        elif not math.isfinite(result["value"]):
            problems[key] = "non-finite value"
        else:
            ok[key] = result
    return ok, problems


def ntk_reference(specs: list[RunRow]) -> tuple[str | None, list[str]]:
    """Return the full NTK-Attention run and its ablations from the run table.

    The reference is the first run of method ntk without method overrides. Ablations are the
    other run-table entries of method ntk whose method settings differ from it. Grid points
    are excluded because the heatmap shows them.
    """
    table_runs = [spec for spec in specs if spec.grid_point is None and spec.method == "ntk"]
    reference = next((spec for spec in table_runs if not spec.has_method_overrides), None)
    if reference is None:
        return None, []
    ablations = [spec.name for spec in table_runs if spec.method_cfg != reference.method_cfg]
    return reference.name, ablations


def describe_problems(spec: RunRow, problems: dict, seeds: tuple[int, ...]) -> str:
    parts = []
    for task in spec.tasks:
        for seed in seeds:
            reason = problems.get((task, spec.name, seed))
            if reason:
                parts.append(f"{task} seed {seed} ({reason})")
    return "; ".join(parts)


def build_table(study: Study, ok: dict, problems: dict) -> tuple[list[str], list[dict]]:
    """Return (columns, rows): one row per run in table order, with the statistics over seeds."""
    specs = run_rows(study)
    metric_of = metrics_by_task(study)
    reference, ablations = ntk_reference(specs)

    columns = ["run", "method"]
    for task, metric in metric_of.items():
        columns += [f"{task}_{metric}_mean", f"{task}_{metric}_ci95", f"{task}_n_seeds"]
    columns += ["trainable_params", "trainable_share_pct", "train_time_s_mean", "peak_mem_mb_max"]
    if reference:
        columns += [f"{task}_delta_vs_{reference}" for task in metric_of]
    columns.append("missing")

    rows = []
    for spec in specs:
        row = {"run": spec.name, "method": spec.method, "missing": describe_problems(spec, problems, study.seeds)}
        run_results = [result for (task, run, _), result in ok.items() if run == spec.name]
        for task, metric in metric_of.items():
            if task not in spec.tasks:
                continue  # not part of the study for this run: the cells stay empty
            values = [ok[(task, spec.name, seed)]["value"] for seed in study.seeds if (task, spec.name, seed) in ok]
            mean, half_width = mean_ci95(values) if values else (math.nan, math.nan)
            row.update({f"{task}_{metric}_mean": mean, f"{task}_{metric}_ci95": half_width, f"{task}_n_seeds": len(values)})

        if run_results:
            row["trainable_params"] = trainable = run_results[0]["trainable_params"]
            if len({result["trainable_params"] for result in run_results}) > 1:
                print(f"warning: {spec.name}: trainable_params differ between result files", file=sys.stderr)
            row["trainable_share_pct"] = 100.0 * trainable / base_params(run_results[0])
            row["train_time_s_mean"] = math.fsum(r["train_time_s"] for r in run_results) / len(run_results)
            row["peak_mem_mb_max"] = max(r["peak_mem_mb"] for r in run_results)
        rows.append(row)

    by_name = {row["run"]: row for row in rows}
    for name in ablations:
        for task, metric in metric_of.items():
            mean_column = f"{task}_{metric}_mean"
            delta = by_name[name].get(mean_column, math.nan) - by_name[reference].get(mean_column, math.nan)
            by_name[name][f"{task}_delta_vs_{reference}"] = delta
    return columns, rows


def git_states(provenance: dict) -> list[dict]:
    """Find the {"commit", "dirty"} records in a result's provenance.

    A result file contains one per stage (provenance["train"]["git"], provenance["evaluate"]["git"]),
    and a single-stage record has provenance["git"].
    """
    records = [provenance["git"]] if isinstance(provenance.get("git"), dict) else []
    for value in provenance.values():
        if isinstance(value, dict) and isinstance(value.get("git"), dict):
            records.append(value["git"])
    return records


def provenance_summary(ok: dict) -> tuple[list[str], list[tuple]]:
    """Return (sorted git commits, keys of results not known to come from a clean tree).

    A result counts as clean only if every git record in its provenance has dirty == False, so a
    result without git records, or with dirty == None (git unavailable), counts as dirty.
    """
    commits, dirty = set(), []
    for key, result in ok.items():
        records = git_states(result["provenance"])
        commits.update(str(record.get("commit") or "unknown") for record in records)
        if not records or any(record.get("dirty") is not False for record in records):
            dirty.append(key)
    return sorted(commits), sorted(dirty)


def _csv_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return format(value, ".10g")
    return str(value)


def _md_number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, f".{digits}g") if isinstance(value, float) else str(value)


def render_csv(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def render_markdown(study: Study, columns: list[str], rows: list[dict], ok: dict, problems: dict) -> str:
    """Render the table for reading: a header with provenance and warnings, then mean ± CI cells."""
    metric_of = metrics_by_task(study)
    commits, dirty = provenance_summary(ok)
    delta_columns = [column for column in columns if "_delta_vs_" in column]
    lines = [
        f"# NTK-Attention ablation study: {study.name}",
        "",
        f"- Results: {len(ok)} ok of {len(ok) + len(problems)} expected, seeds {list(study.seeds)}.",
        f"- Git commit(s): {', '.join(commits) or 'none'}.",
        f"- From a dirty or unknown git tree: {f'yes, {len(dirty)} result(s)' if dirty else 'no'}.",
        "- Cells: mean ± 95% Student-t half width (number of seeds); one seed gives no interval.",
    ]
    if str(study.model["source"]).startswith("pretrain-"):
        lines.append(f"- Base model: pretrained inside this pipeline (model.source = {study.model['source']}), "
                     "a small model trained from random weights, not a released checkpoint; see models/base/base_model.json.")
    for task, metric in metric_of.items():
        better = "lower" if LOWER_IS_BETTER[metric] else "higher"
        lines.append(f"- {task}: {metric}, {better} is better.")
    if delta_columns:
        reference = delta_columns[0].split("_delta_vs_")[1]
        lines.append(
            f"- delta_vs_{reference}: ablation mean minus the {reference} mean; a negative delta is better "
            "for perplexity, a positive delta is better for accuracy."
        )
    if problems:
        lines += ["", f"> **Warning:** {len(problems)} result(s) missing or failed, left out of the means: "
                  + "; ".join(f"{run} {task} seed {seed} ({why})" for (task, run, seed), why in sorted(problems.items())) + "."]

    header = ["run", "method"] + [f"{task} {metric}" for task, metric in metric_of.items()] + delta_columns
    header += ["trainable params", "trainable %", "train time s", "peak mem MB", "missing"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["run"], row["method"]]
        for task, metric in metric_of.items():
            mean = row.get(f"{task}_{metric}_mean")
            if f"{task}_n_seeds" not in row:
                cells.append("")
            elif row[f"{task}_n_seeds"] == 0:
                cells.append("- (0)")
            elif math.isnan(row[f"{task}_{metric}_ci95"]):
                cells.append(f"{_md_number(mean)} ({row[f'{task}_n_seeds']})")
            else:
                cells.append(f"{_md_number(mean)} ± {_md_number(row[f'{task}_{metric}_ci95'], 3)} ({row[f'{task}_n_seeds']})")
        cells += [_md_number(row[column]) if column in row else "" for column in delta_columns]
        cells += [_md_number(row.get("trainable_params")), _md_number(row.get("trainable_share_pct"), 3),
                  _md_number(row.get("train_time_s_mean"), 3), _md_number(row.get("peak_mem_mb_max"), 4),
                  row["missing"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_plot(study: Study, rows: list[dict], path: Path) -> None:
    """Draw mean ± CI per run for each task, and an r x s heatmap per grid task."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no GUI backend

    metric_of = metrics_by_task(study)
    grid_runs = {spec.grid_point: spec.name for spec in run_rows(study) if spec.grid_point}
    grid_tasks = list(study.grid["tasks"]) if grid_runs else []
    r_values, s_values = list(study.grid["r"]), list(study.grid["s"])
    n_panels = len(metric_of) + len(grid_tasks)
    figure = Figure(figsize=(5.5 * n_panels, 4.5), layout="constrained")
    axes = figure.subplots(1, n_panels, squeeze=False)[0]

    for ax, (task, metric) in zip(axes, metric_of.items()):
        shown = [row for row in rows if f"{task}_n_seeds" in row]
        means = [row[f"{task}_{metric}_mean"] for row in shown]
        errors = [row[f"{task}_{metric}_ci95"] for row in shown]
        positions = range(len(shown))
        # A single seed has no interval, so a hollow marker keeps it apart from a zero-width one.
        single = [i for i, row in enumerate(shown) if row[f"{task}_n_seeds"] == 1]
        several = [i for i in positions if i not in single]
        log_scale = metric == "perplexity"
        lower = [errors[i] for i in several]
        if log_scale:
            # A t interval from two seeds can reach below zero; on a log axis the bar stops just above it.
            lower = [min(err, 0.99 * means[i]) for err, i in zip(lower, several)]
            ax.set_yscale("log")
        ax.errorbar(several, [means[i] for i in several], yerr=[lower, [errors[i] for i in several]],
                    fmt="o", color="C0", capsize=4)
        if single:
            ax.plot(single, [means[i] for i in single], "o", color="C0", markerfacecolor="white", label="one seed")
            ax.legend()
        ax.set_xticks(list(positions), [row["run"] for row in shown], rotation=45, ha="right")
        better = "lower" if LOWER_IS_BETTER[metric] else "higher"
        scale_note = ", log scale" if log_scale else ""
        ax.set_title(f"{task}: {metric} ({better} is better), mean ± 95% CI{scale_note}")
        ax.grid(axis="y", alpha=0.3)

    for ax, task in zip(axes[len(metric_of):], grid_tasks):
        metric = metric_of[task]
        by_name = {row["run"]: row for row in rows}
        cells = [[by_name[grid_runs[(r, s)]].get(f"{task}_{metric}_mean", math.nan) for s in s_values] for r in r_values]
        image = ax.imshow(cells, cmap="viridis_r" if LOWER_IS_BETTER[metric] else "viridis", aspect="auto")
        ax.set_xticks(range(len(s_values)), [str(s) for s in s_values])
        ax.set_yticks(range(len(r_values)), [str(r) for r in r_values])
        ax.set_xlabel("s (rank of Z)")
        ax.set_ylabel("r (feature width)")
        ax.set_title(f"{task}: {metric} over the {study.grid['base']} grid")
        for i, row_cells in enumerate(cells):
            for j, value in enumerate(row_cells):
                ax.text(j, i, _md_number(value), ha="center", va="center", bbox={"facecolor": "white", "alpha": 0.7})
        figure.colorbar(image, ax=ax)
    figure.savefig(path, format="png", dpi=120)


def render_metrics(columns: list[str], rows: list[dict]) -> str:
    """Per-run means as nested JSON ({run: {column: value}}), the shape `dvc exp show` lists."""
    numeric = [c for c in columns if c.endswith(("_mean", "_ci95", "_delta_vs_ntk"))]
    metrics = {}
    for row in rows:
        values = {c: row[c] for c in numeric if isinstance(row.get(c), (int, float)) and math.isfinite(row[c])}
        metrics[row["run"]] = values
    return json.dumps(metrics, indent=2) + "\n"


def write_outputs(outputs: dict[Path, str | None], study: Study, rows: list[dict]) -> None:
    """Write every output under a temporary name first, then rename each into place.

    A value of None marks the plot, which is drawn rather than rendered as text. Each call gets
    its own temporary files, so two aggregate runs at once never rename each other's partial file.
    """
    temporary = {}
    try:
        for path, text in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(handle)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(name, 0o666 & ~umask)  # mkstemp creates 0600; the tables are for everyone to read
            temporary[path] = Path(name)
            if text is None:
                draw_plot(study, rows, temporary[path])
            else:
                temporary[path].write_text(text)
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ntkattn.study.aggregate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, required=True, help="study parameters (params.yaml)")
    parser.add_argument("--results", type=Path, required=True, help="folder containing <task>/<run>/seed<seed>.json")
    parser.add_argument("--out", type=Path, required=True, help="CSV table to write; the .md copy goes beside it")
    parser.add_argument("--plot", type=Path, default=None, help="plot to write (default: ablation_plot.png beside --out)")
    parser.add_argument("--metrics", type=Path, default=None,
                        help="JSON of per-run means to write for `dvc exp show` (default: none)")
    parser.add_argument("--exclude-dirty", action="store_true",
                        help="treat results from a dirty or unknown git tree as failed, for an official table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        study = load_study(args.params)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        ok, problems = collect(study, args.results)
    except ResultError as error:
        print(f"error: {error}. Nothing was written; fix or delete the file and rerun.", file=sys.stderr)
        return 2

    if args.exclude_dirty:
        for key in provenance_summary(ok)[1]:
            del ok[key]
            problems[key] = "dirty tree"
    for (task, run, seed), why in sorted(problems.items()):
        print(f"warning: {run} {task} seed {seed}: {why}; left out of the means", file=sys.stderr)

    columns, rows = build_table(study, ok, problems)
    plot = args.plot or args.out.with_name("ablation_plot.png")
    outputs = {
        args.out: render_csv(columns, rows),
        args.out.with_suffix(".md"): render_markdown(study, columns, rows, ok, problems),
        plot: None,
    }
    if args.metrics is not None:
        outputs[args.metrics] = render_metrics(columns, rows)
    write_outputs(outputs, study, rows)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {plot} ({len(ok)} ok results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
