"""``python -m unified_vlm report FILE|RUN_DIR``: tables and figures of an experiment's cells.

Cells are grouped by every axis but the seed; each group's metrics are shown as mean +- sample
standard deviation over its finished seeds, with n, and failed or unfinished cells are marked.
Metrics are whatever numeric fields the cells' ``test_scores.json`` hold (VQA per attribute today;
new groups such as ``generation`` appear without code changes). Figures (matplotlib):

- ``curves.png``: validation curves of both tasks per regime from ``metrics.csv`` (docs/paper.md Fig. 3);
- ``<axis>.png`` for each numeric axis (or ``report.lines`` entry): score vs axis value with
  error bars, one line per group of the other axes (distortion strength, Fig. 4; added data, Fig. 5);
- ``bars.png``: grouped bars of the chosen metrics per group (e.g. knowledge transfer).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from unified_vlm.experiments import results
from unified_vlm.experiments.spec import CURVE_TASKS, DEFAULT_COMPARE, DEFAULT_CURVES, DEFAULT_THRESHOLDS

EXPERIMENT_FILE = "experiment.json"


@dataclass
class CellResult:
    id: str
    labels: dict[str, str]
    state: str
    scores: Optional[dict[str, float]]
    metrics: list[dict[str, float]]
    tasks: tuple[str, ...]
    reason: str = ""


@dataclass
class Experiment:
    """What ``report`` needs: the axes (names, kinds, labels), options and the cells' results."""

    name: str
    description: str
    directory: Path
    axes: list[dict[str, Any]]
    options: dict[str, Any]
    cells: list[CellResult] = field(default_factory=list)

    @property
    def replicate_axis(self) -> Optional[str]:
        """The axis averaged over: the seed axis, or ``report.replicates`` (e.g. an overrides axis of
        starting checkpoints that each carry their own seed)."""
        return self.options.get("replicates") or self.axis("seed")

    @property
    def group_axes(self) -> list[str]:
        return [a["name"] for a in self.axes if a["kind"] != "seed" and a["name"] != self.replicate_axis]

    def axis(self, kind: str) -> Optional[str]:
        return next((a["name"] for a in self.axes if a["kind"] == kind), None)


def snapshot(spec, out_dir: Path) -> dict[str, Any]:
    """The part of an experiment file ``report`` needs, saved in the run directory."""
    return {
        "name": spec.name, "description": spec.description, "file": str(spec.path), "options": spec.report,
        "axes": [{"name": a.name, "kind": a.kind, "labels": a.labels} for a in spec.axes],
        "cells": [{"id": c.id, "labels": c.labels} for c in spec.cells()],
    }


def _tasks(directory: Path) -> tuple[str, ...]:
    from unified_vlm.datamodules.unified_datamodule import MODES

    config = directory / "config.yaml"
    if not config.is_file():
        return ()
    mode = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("mode", "mixed")
    return tuple(MODES.get(mode, ()))


def load(target: str | Path, out: Optional[str | Path] = None) -> Experiment:
    """An experiment from its file (run directory: ``--out`` or the default) or from its run directory."""
    target = Path(target)
    if target.is_dir():
        meta_path = target / EXPERIMENT_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{target} has no {EXPERIMENT_FILE}: is it an experiment's run directory? "
                                    "(python -m unified_vlm experiment writes it)")
        meta, directory = json.loads(meta_path.read_text()), target
    else:
        from unified_vlm.experiments.spec import default_out, load_spec

        spec = load_spec(target)
        directory = Path(out) if out else default_out(spec)
        meta = snapshot(spec, directory)
    experiment = Experiment(meta["name"], meta.get("description", ""), directory, meta["axes"], meta.get("options") or {})
    for cell in meta["cells"]:
        path = directory / cell["id"]
        state = results.state(path) if path.is_dir() else "not run"
        reason = ""
        if state == "failed":
            reason = json.loads((path / results.FAILED).read_text()).get("reason", "")
        elif state in ("resume", "new") and path.is_dir():
            state = "unfinished"
        experiment.cells.append(CellResult(
            cell["id"], cell["labels"], state,
            results.read_scores(path) if state == "done" else None,
            results.merged_metrics(path) if path.is_dir() else [],
            _tasks(path), reason,
        ))
    return experiment


# ------------------------------------------------------------------------------------------ numbers
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def groups(experiment: Experiment) -> dict[tuple[str, ...], list[CellResult]]:
    """Cells by their labels on every non-seed axis, in file order."""
    out: dict[tuple[str, ...], list[CellResult]] = {}
    for cell in experiment.cells:
        out.setdefault(tuple(cell.labels[a] for a in experiment.group_axes), []).append(cell)
    return out


def metric_names(experiment: Experiment) -> list[str]:
    names: list[str] = []
    for cell in experiment.cells:
        for key in cell.scores or {}:
            if key not in names:
                names.append(key)
    return names


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {std:.3f}"


def tables(experiment: Experiment) -> str:
    """One markdown table per metric scope (the part before the first dot, e.g. all_turns / first_turn)."""
    names = metric_names(experiment)
    scopes: dict[str, list[str]] = {}
    for name in names:
        scope = name.split(".", 1)[0] if "." in name else "scores"
        scopes.setdefault(scope, []).append(name)
    if not scopes:  # nothing numeric yet (no cell finished, or e.g. only generation-only cells before generation metrics)
        scopes["cells"] = []
    grouped = groups(experiment)
    out = []
    seed = experiment.replicate_axis
    over = f"over the `{seed}` axis" if seed else "(one run per row: no seed axis)"
    for scope, columns in scopes.items():
        short = [c.split(".", 1)[1] if "." in c else c for c in columns]
        out.append(f"### {scope}\n\nmean ± sample std {over}; n = finished cells.\n")
        header = experiment.group_axes + short + ["n", "not done"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for key, cells in grouped.items():
            done = [c for c in cells if c.scores is not None]
            row = list(key) + [_fmt([c.scores[m] for c in done if m in c.scores]) for m in columns]
            missing = [f"{seed + '=' + c.labels[seed] if seed else c.id}: {c.state}" for c in cells if c.scores is None]
            row += [str(len(done)), "; ".join(missing) or ""]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def steps_to(metrics: list[dict[str, float]], column: str, level: float) -> Optional[int]:
    """Optimiser steps until ``column`` is first logged at ``level`` or above (the CSV's ``step`` is
    zero-based, so a validation at step 399 comes after 400 steps); None if it never is."""
    for row in metrics:
        if column in row and "step" in row and row[column] >= level:
            return int(row["step"]) + 1
    return None


def thresholds_table(experiment: Experiment) -> str:
    """Steps to each threshold per group: mean ± std over the seeds that reached it, and k/n reached
    (n counts the finished cells that log the column); a regime that does not train the task is left out."""
    levels = experiment.options.get("thresholds") or DEFAULT_THRESHOLDS
    grouped = groups(experiment)
    header = experiment.group_axes + [f"{column} >= {level:g}" for column, level in levels.items()]
    out = ["### steps to threshold", "",
           "Optimiser steps until the validation probe first reaches the level: mean ± sample std over the seeds "
           "that reached it, then reached/finished. The probes run every `trainer.val_check_interval` optimiser steps "
           "(taken across data epochs where the trainer sets `check_val_every_n_epoch: null`, as the shipped files do; "
           "otherwise Lightning starts the interval again at each epoch), so a step is only as fine as that interval.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = 0
    for key, cells in grouped.items():
        done = [c for c in cells if c.state == "done"]
        row = list(key)
        for column, level in levels.items():
            logged = [c for c in done if any(column in r for r in c.metrics)]
            reached = [s for s in (steps_to(c.metrics, column, level) for c in logged) if s is not None]
            if not logged:
                row.append("-")
                continue
            mean, std = mean_std([float(s) for s in reached]) if reached else (0.0, 0.0)
            shown = "never" if not reached else f"{mean:.0f}" if len(reached) == 1 else f"{mean:.0f} ± {std:.0f}"
            row.append(f"{shown} ({len(reached)}/{len(logged)})")
        rows += any(cell != "-" for cell in row[len(key):])
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n" if rows else ""


REFERENCE_REGIME = "mixed"


def standard_error(a: list[float], b: list[float]) -> Optional[float]:
    """The standard error of mean(a) - mean(b), sqrt(s_a^2/n_a + s_b^2/n_b) (Welch's); None where a
    side has one value."""
    if len(a) < 2 or len(b) < 2:
        return None
    return math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def difference(a: list[float], b: list[float]) -> tuple[float, Optional[float]]:
    """Mean of ``a`` minus mean of ``b``, and that difference over its standard error; None where a
    side has one value or both have no spread."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = standard_error(a, b)
    return diff, (diff / se if se else None)


def differences_table(experiment: Experiment) -> str:
    """The mixed regime minus each other regime, per group of the other axes, on the test scores of
    ``report.compare``: the difference of the means and how many standard errors it is. Empty for an
    experiment without a regime axis holding ``mixed``."""
    regime = experiment.axis("regime")
    if regime is None:
        return ""
    metrics = experiment.options.get("compare") or DEFAULT_COMPARE
    others = [a for a in experiment.group_axes if a != regime]
    by_group: dict[tuple[str, ...], dict[str, list[CellResult]]] = {}
    for cell in experiment.cells:
        if cell.scores is not None:
            key = tuple(cell.labels[a] for a in others)
            by_group.setdefault(key, {}).setdefault(cell.labels[regime], []).append(cell)
    rows = []
    for key, regimes in by_group.items():
        reference = regimes.get(REFERENCE_REGIME, [])
        for metric in metrics:
            a = [c.scores[metric] for c in reference if metric in c.scores]
            if not a:
                continue
            mean_a = f"{statistics.fmean(a):.3f}"
            for label, cells in regimes.items():
                b = [c.scores[metric] for c in cells if metric in c.scores]
                if label == REFERENCE_REGIME or not b:
                    continue
                diff, z = difference(a, b)
                shown = f"{z:+.1f}" if z is not None else "-"
                rows.append(list(key) + [metric, label, mean_a, f"{statistics.fmean(b):.3f}",
                                         f"{diff:+.3f}", shown, f"{len(a)} / {len(b)}"])
    if not rows:
        return ""
    header = others + ["test score", f"{REFERENCE_REGIME} minus", REFERENCE_REGIME, "baseline", "difference", "in SE", "n"]
    out = ["### differences", "",
           f"The `{REFERENCE_REGIME}` regime minus each baseline: the difference of the means and that difference over "
           "its standard error, sqrt(s1^2/n1 + s2^2/n2) with sample std over the seeds (`-` where a side has fewer "
           "than two seeds). With three seeds a difference under about 3 SE is not firm.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series_label(experiment: Experiment, key: tuple[str, ...], skip: set[str]) -> str:
    parts = [f"{a}={label}" for a, label in zip(experiment.group_axes, key) if a not in skip]
    return ", ".join(parts) or experiment.name


def _curve(cells: list[CellResult], column: str) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over cells of ``column`` at each logged step."""
    by_step: dict[float, list[float]] = {}
    for cell in cells:
        for row in cell.metrics:
            if column in row and "step" in row:
                by_step.setdefault(row["step"], []).append(row[column])
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def curves_figure(experiment: Experiment, path: Path) -> Optional[Path]:
    """Validation curves of both tasks: one row per group of the axes other than regime and seed,
    one line per regime (docs/paper.md Fig. 3); a regime is drawn only on the tasks it trains."""
    columns = {**DEFAULT_CURVES, **(experiment.options.get("curves") or {})}
    regime = experiment.axis("regime")
    rows_axes = [a for a in experiment.group_axes if a != regime]
    rows: dict[tuple[str, ...], dict[str, list[CellResult]]] = {}
    for cell in experiment.cells:
        row = tuple(cell.labels[a] for a in rows_axes)
        line = cell.labels[regime] if regime else "all"
        rows.setdefault(row, {}).setdefault(line, []).append(cell)
    if not any(col in r for c in experiment.cells for r in c.metrics for col in columns.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.2 * len(rows)), squeeze=False)
    for r, (row, lines) in enumerate(rows.items()):
        for c, (task, column) in enumerate(columns.items()):
            ax = axes[r][c]
            drawn = False
            for label, cells in lines.items():
                cells = [x for x in cells if not x.tasks or CURVE_TASKS[task] in x.tasks]
                steps, mean, std = _curve(cells, column)
                if not steps:
                    continue
                logged = sum(1 for x in cells if any(column in row for row in x.metrics))  # cells with this curve
                ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} (n={logged})")
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
                drawn = True
            title = ", ".join(f"{a}={label}" for a, label in zip(rows_axes, row))
            ax.set_title(f"{task}: {column}" + (f"\n{title}" if title else ""), fontsize=9)
            ax.set_xlabel("optimiser step")
            if drawn:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, f"{column} not logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _numeric(label: str) -> Optional[float]:
    try:
        return float(label)
    except ValueError:
        return None


def line_specs(experiment: Experiment) -> list[dict[str, Any]]:
    """``report.lines``, or one figure per non-seed axis whose labels are all numbers."""
    if experiment.options.get("lines"):
        return list(experiment.options["lines"])
    specs = []
    for axis in experiment.axes:
        if axis["kind"] != "seed" and len(axis["labels"]) > 1 and all(_numeric(label) is not None for label in axis["labels"]):
            specs.append({"axis": axis["name"]})
    return specs


def default_metrics(experiment: Experiment, count: Optional[int] = None) -> list[str]:
    names = metric_names(experiment)
    preferred = [n for n in names if n.startswith("all_turns.")] or names
    return preferred[:count] if count else preferred


def line_metrics(experiment: Experiment, spec: dict[str, Any]) -> list[str]:
    """The scores a ``report.lines`` entry draws: its ``metrics`` (default: the totals) that some cell has."""
    names = metric_names(experiment)
    wanted = spec.get("metrics") or [m for m in default_metrics(experiment) if m.endswith("total")] or default_metrics(experiment, 1)
    return [m for m in wanted if m in names]


def axis_positions(experiment: Experiment, spec: dict[str, Any]) -> tuple[list[str], dict[str, Optional[float]]]:
    """The labels of a ``report.lines`` entry's axis and the x of each: from its ``x`` mapping, else the
    label read as a number. With a mapping, a label left out of it (e.g. "none" beside strengths) has
    x None: a reference, drawn as a dashed horizontal line instead of a point."""
    axis = spec["axis"]
    positions = {str(k): float(v) for k, v in (spec.get("x") or {}).items()}
    labels = next(a["labels"] for a in experiment.axes if a["name"] == axis)
    x_of = {label: positions.get(label, _numeric(label)) for label in labels}
    references = [label for label, v in x_of.items() if v is None]
    if references and not spec.get("x"):
        raise ValueError(f"report.lines for axis {axis!r}: labels {references} are not numbers; give x: {{label: number}}")
    return labels, x_of


def line_figure(experiment: Experiment, spec: dict[str, Any], path: Path) -> Optional[Path]:
    """Score vs axis value with error bars (std over seeds), one line per group of the other axes."""
    axis = spec["axis"]
    metrics = line_metrics(experiment, spec)
    if not metrics:
        return None
    labels, x_of = axis_positions(experiment, spec)
    references = [label for label, v in x_of.items() if v is None]
    others = [a for a in experiment.group_axes if a != axis]
    series: dict[tuple[str, ...], dict[str, list[CellResult]]] = {}
    for cell in experiment.cells:
        if cell.scores is None:
            continue
        series.setdefault(tuple(cell.labels[a] for a in others), {}).setdefault(cell.labels[axis], []).append(cell)
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for key, by_label in series.items():
            name = ", ".join(f"{a}={label}" for a, label in zip(others, key)) or metric
            points, colour = [], None
            for label in labels:
                values = [c.scores[metric] for c in by_label.get(label, []) if metric in c.scores]
                if values and x_of[label] is not None:
                    points.append((x_of[label], *mean_std(values)))
            if points:
                xs, ys, es = zip(*points)
                colour = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)[0].get_color()
            for label in references:
                values = [c.scores[metric] for c in by_label.get(label, []) if metric in c.scores]
                if values:
                    ax.axhline(mean_std(values)[0], linestyle="--", linewidth=1, color=colour, label=f"{name}, {axis}={label}")
        ax.set_xlabel(axis)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gain_points(experiment: Experiment, spec: dict[str, Any]) -> dict[tuple[str, str, tuple[str, ...]], list[tuple[float, float, Optional[float]]]]:
    """The mixed regime's gain over each baseline along a ``report.lines`` axis (e.g. model size):
    for each (score, baseline, group of the remaining axes), the points (x, mixed mean minus baseline
    mean, its standard error or None) at every axis label with both sides scored and an x (a
    reference label, left out of the ``x`` mapping, has no place on a gain axis). Empty where the
    experiment has no regime axis, or the line's axis is the regime."""
    regime, axis = experiment.axis("regime"), spec["axis"]
    if regime is None or axis == regime:
        return {}
    labels, x_of = axis_positions(experiment, spec)
    others = [a for a in experiment.group_axes if a not in (axis, regime)]
    by: dict[tuple[tuple[str, ...], str, str], list[CellResult]] = {}
    for cell in experiment.cells:
        if cell.scores is not None:
            by.setdefault((tuple(cell.labels[a] for a in others), cell.labels[axis], cell.labels[regime]), []).append(cell)
    baselines = [r for r in next(a["labels"] for a in experiment.axes if a["name"] == regime) if r != REFERENCE_REGIME]
    points: dict[tuple[str, str, tuple[str, ...]], list[tuple[float, float, Optional[float]]]] = {}
    for metric in line_metrics(experiment, spec):
        for key in dict.fromkeys(k for k, _, _ in by):
            for baseline in baselines:
                for label in labels:
                    mixed = [c.scores[metric] for c in by.get((key, label, REFERENCE_REGIME), []) if metric in c.scores]
                    base = [c.scores[metric] for c in by.get((key, label, baseline), []) if metric in c.scores]
                    if mixed and base and x_of[label] is not None:
                        diff = statistics.fmean(mixed) - statistics.fmean(base)
                        points.setdefault((metric, baseline, key), []).append((x_of[label], diff, standard_error(mixed, base)))
    return points


def gain_figure(experiment: Experiment, spec: dict[str, Any], path: Path) -> Optional[Path]:
    """Mixed minus each baseline vs the axis of a ``report.lines`` entry, ±1 standard error: where the
    gain of mixing changes sign along model size (docs/experiments.md)."""
    points = gain_points(experiment, spec)
    if not points:
        return None
    metrics = list(dict.fromkeys(metric for metric, _, _ in points))
    others = [a for a in experiment.group_axes if a not in (spec["axis"], experiment.axis("regime"))]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.axhline(0.0, color="grey", linewidth=0.8)
        for (m, baseline, key), series in points.items():
            if m != metric:
                continue
            xs, ys, ses = zip(*series)
            name = ", ".join([f"{REFERENCE_REGIME} - {baseline}"] + [f"{a}={label}" for a, label in zip(others, key)])
            ax.errorbar(xs, ys, yerr=[se or 0.0 for se in ses], marker="o", capsize=3, label=name)
        ax.set_xlabel(spec["axis"])
        ax.set_ylabel(f"{metric}: mixed gain (±1 SE)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tick_labels(metrics: list[str]) -> list[str]:
    """Metric names without their scope (``all_turns.weather`` -> ``weather``) unless two would then
    read the same (all_turns.weather and first_turn.weather), in which case the full names."""
    short = [m.split(".", 1)[-1] for m in metrics]
    return short if len(set(short)) == len(short) else list(metrics)


def bars_figure(experiment: Experiment, path: Path) -> Optional[Path]:
    """Grouped bars: one cluster per metric, one bar per group (mean, std error bar)."""
    names = metric_names(experiment)
    metrics = [m for m in ((experiment.options.get("bars") or {}).get("metrics") or default_metrics(experiment)) if m in names]
    grouped = {k: [c for c in v if c.scores is not None] for k, v in groups(experiment).items()}
    grouped = {k: v for k, v in grouped.items() if v}
    if not metrics or not grouped:
        return None
    plt = _pyplot()
    width = 0.8 / len(grouped)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(metrics) * max(1, len(grouped)) * 0.35 + 2), 4))
    for g, (key, cells) in enumerate(grouped.items()):
        means, stds = [], []
        for metric in metrics:
            values = [c.scores[metric] for c in cells if metric in c.scores]
            mean, std = mean_std(values) if values else (math.nan, 0.0)
            means.append(mean)
            stds.append(std)
        xs = [m + (g - (len(grouped) - 1) / 2) * width for m in range(len(metrics))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=_series_label(experiment, key, set()))
    ax.set_xticks(range(len(metrics)), tick_labels(metrics), rotation=30, ha="right")
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(experiment: Experiment) -> Path:
    """``report.md`` and the figures, in the experiment's run directory."""
    directory = experiment.directory
    directory.mkdir(parents=True, exist_ok=True)
    figures = []
    curve = curves_figure(experiment, directory / "curves.png")
    if curve:
        figures.append(("Validation curves of both tasks per regime (docs/paper.md Fig. 3)", curve))
    for spec in line_specs(experiment):
        figure = line_figure(experiment, spec, directory / f"{spec['axis']}.png")
        if figure:
            figures.append((f"Score vs {spec['axis']} (error bars: std over seeds)", figure))
        gain = gain_figure(experiment, spec, directory / f"{spec['axis']}_gain.png")
        if gain:
            figures.append((f"Mixed minus each baseline vs {spec['axis']} (error bars: ±1 standard error)", gain))
    bars = bars_figure(experiment, directory / "bars.png")
    if bars:
        figures.append(("Scores per group (error bars: std over seeds)", bars))
    states: dict[str, int] = {}
    for cell in experiment.cells:
        states[cell.state] = states.get(cell.state, 0) + 1
    lines = [f"# Experiment {experiment.name}", ""]
    if experiment.description:
        lines += [experiment.description.strip(), ""]
    lines += [f"Run directory: `{directory}`. Cells: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ".", ""]
    if not metric_names(experiment):
        lines += ["No finished cell has a numeric score yet (a generation-only cell has no VQA score).", ""]
    lines += [tables(experiment), differences_table(experiment), thresholds_table(experiment)]
    failed = [c for c in experiment.cells if c.state == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- `{c.id}`: {c.reason}; log `{directory / c.id / 'log.txt'}`" for c in failed]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{title}]({p.name})\n\n{title}: `{p.name}`\n" for title, p in figures]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path


def check_archive_owner(out: Path, meta: dict[str, Any]) -> None:
    """Refuse the archive ``out`` unless it holds the experiment ``meta`` describes (same name and axes):
    cells of another experiment, or of other axes, must never be mixed into it or read from it."""
    before = json.loads((out / EXPERIMENT_FILE).read_text())
    if before.get("name") != meta.get("name"):
        raise ValueError(f"{out} archives experiment {before.get('name')!r}, not {meta.get('name')!r}: choose its own archive")
    if before.get("axes") != meta.get("axes"):
        raise ValueError(f"{out} archives experiment {meta.get('name')!r} with other axes than its file has now "
                         f"({before.get('axes')} against {meta.get('axes')}): choose another archive")


def archive(experiment: Experiment, out: Path) -> list[str]:
    """Copy ``experiment.json`` and every finished cell's scores and training log into ``out``
    (``results.archive_cell``), adding to cells archived there before (from other machines or
    sessions). ``report OUT`` then redraws the tables and figures from the archive alone.
    Returns the ids of the cells copied."""
    out = Path(out)
    meta = {"name": experiment.name, "description": experiment.description, "options": experiment.options,
            "axes": experiment.axes, "cells": [{"id": c.id, "labels": c.labels} for c in experiment.cells]}
    if (out / EXPERIMENT_FILE).is_file():
        check_archive_owner(out, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPERIMENT_FILE).write_text(json.dumps(meta, indent=2))
    copied = []
    for cell in experiment.cells:
        if cell.state == "done" and (experiment.directory / cell.id).resolve() != (out / cell.id).resolve():
            results.archive_cell(experiment.directory / cell.id, out / cell.id)
            copied.append(cell.id)
    return copied


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unified_vlm report",
                                     description="Tables (mean ± std over seeds) and figures of an experiment; see docs/experiments.md.")
    parser.add_argument("target", help="experiment file (configs/experiments/<name>.yaml) or its run directory")
    parser.add_argument("--out", default=None, help="the experiment's run directory when it is not the default runs/experiments/<name>")
    parser.add_argument("--archive", default=None, metavar="DIR",
                        help="also copy every finished cell's scores and training log (a few KB each) into DIR, beside "
                             "cells archived there before, and write DIR's own report over all its cells; `report DIR` "
                             "redraws that report where the run directory is gone")
    args = parser.parse_args(argv)
    from unified_vlm.experiments.spec import SpecError

    try:
        experiment = load(args.target, args.out)
        path = write_report(experiment)
        if args.archive:
            copied = archive(experiment, Path(args.archive))
            print(f"archived {len(copied)} finished cell(s) in {args.archive}")
            # the report a reader wants is the archive's: every cell of every machine, not this run's alone
            print(f"wrote {path} (this run directory's cells)")
            path = write_report(load(args.archive))
    except (SpecError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"wrote {path}")
    return 0
