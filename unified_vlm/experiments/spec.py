"""The experiment file: a base ``fit`` config, fixed overrides and axes whose cross product is the cells.

An experiment is data, not code (prismatic-vlms style): every cell is an ordinary
``python -m unified_vlm fit`` run that differs from the base only where an axis says. This module
reads and checks the file and expands the cells; it does not import torch or Lightning, so
``--dry-run`` errors in the file itself are reported instantly.

Axis kinds (``kind:``):

- ``config``: each value names one or more ``fit`` config files that replace ``base``
  (e.g. the architecture: ``{siglip_vq: configs/tiny_siglip_vq.yaml}``).
- ``regime``: the paper's data regimes (docs/paper.md 3.3): ``mixed``, and ``understanding`` /
  ``generation`` each as ``_epoch`` (the share of the mixed run's steps its records make up: the
  paper's baseline) or ``_step`` (as many optimiser steps as the mixed run).
- ``seed``: integers passed as ``--seed_everything`` (and to every key in ``keys``); ``report``
  averages over this axis.
- ``key``: one dotted ``fit`` key and its values (``key: model.optim.lr``, ``values: [1e-4, 3e-4]``);
  values may be a list (label = the value) or a mapping label -> value.
- ``overrides``: a mapping label -> {dotted key: value, ...} (e.g. dataset variants).
"""
from __future__ import annotations

import fnmatch
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

AXIS_KINDS = ("config", "regime", "seed", "key", "overrides")
REGIMES = ("mixed", "understanding_epoch", "understanding_step", "generation_epoch", "generation_step")
TOP_LEVEL_KEYS = ("name", "description", "base", "fixed", "axes", "include", "exclude", "slurm", "report")
AXIS_KEYS = {"kind", "values", "key", "keys", "description"}
RULE_KEYS = {"name", "match"}
# Keys the runner sets for every cell (its own directory, logger, checkpoint and scoring): an
# experiment that set them would break skip / resume / report.
RESERVED_KEYS = ("config", "ckpt_path", "test_after_fit", "trainer.default_root_dir", "trainer.logger", "checkpoint.dirpath")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
CELL_SEPARATOR = "__"


class SpecError(ValueError):
    """A problem with an experiment file, worded as what to change."""


@dataclass
class Axis:
    """One dimension of the matrix: ordered labels, each with the ``fit`` overrides it stands for."""

    name: str
    kind: str
    labels: list[str]
    overrides: dict[str, dict[str, Any]]
    """label -> {dotted key: value}; empty for ``regime`` (computed per cell from its resolved config)."""
    configs: dict[str, list[Path]] = field(default_factory=dict)
    """``config`` axes: label -> config files replacing ``base``."""


@dataclass
class Rule:
    """A named include / exclude rule: axis -> label patterns (fnmatch); a cell matches when every axis matches."""

    name: str
    match: dict[str, list[str]]

    def matches(self, labels: dict[str, str]) -> bool:
        return all(any(fnmatch.fnmatchcase(labels[a], p) for p in pats) for a, pats in self.match.items())


@dataclass
class Cell:
    """One run of the matrix: its labels per axis, config files and fixed + axis overrides (regime: see ``regime``)."""

    id: str
    labels: dict[str, str]
    configs: list[Path]
    overrides: dict[str, Any]
    regime: Optional[str] = None


@dataclass
class ExperimentSpec:
    """A parsed, checked experiment file."""

    name: str
    path: Path
    description: str
    base: list[Path]
    fixed: dict[str, Any]
    axes: list[Axis]
    include: list[Rule]
    exclude: list[Rule]
    slurm: dict[str, Any]
    report: dict[str, Any]

    @property
    def seed_axis(self) -> Optional[str]:
        return next((a.name for a in self.axes if a.kind == "seed"), None)

    @property
    def regime_axis(self) -> Optional[str]:
        return next((a.name for a in self.axes if a.kind == "regime"), None)

    def cells(self) -> list[Cell]:
        """The cross product of the axes, in file order, less excluded cells (and, with ``include``, only included ones)."""
        cells = []
        for combo in itertools.product(*[a.labels for a in self.axes]):
            labels = dict(zip([a.name for a in self.axes], combo))
            if self.include and not any(r.matches(labels) for r in self.include):
                continue
            if any(r.matches(labels) for r in self.exclude):
                continue
            configs, overrides, regime = list(self.base), dict(self.fixed), None
            for axis, label in zip(self.axes, combo):
                if axis.kind == "config":
                    configs = list(axis.configs[label])
                elif axis.kind == "regime":
                    regime = label
                overrides.update(axis.overrides.get(label, {}))
            cell_id = CELL_SEPARATOR.join(f"{a}={label}" for a, label in labels.items()) or "single"
            cells.append(Cell(cell_id, labels, configs, overrides, regime))
        if not cells:
            raise SpecError(f"{self.path}: the include/exclude rules leave no cell; loosen them")
        return cells


def select(cells: list[Cell], pattern: Optional[str]) -> list[Cell]:
    """Cells matching ``--only``: comma-separated ``axis=label`` parts (fnmatch), each matching one part of the id."""
    if not pattern:
        return cells
    parts = [p.strip() for p in pattern.split(",") if p.strip()]

    def matches(cell: Cell, p: str) -> bool:
        return any(fnmatch.fnmatchcase(piece, p) for piece in cell.id.split(CELL_SEPARATOR)) or fnmatch.fnmatchcase(cell.id, p)

    chosen = [c for c in cells if all(matches(c, p) for p in parts)]
    if not chosen:
        raise SpecError(f"--only {pattern!r} matches no cell; cells look like {cells[0].id!r}")
    return chosen


# ---------------------------------------------------------------------------------------- parsing
def _resolve_path(value: Any, where: str, spec_path: Path) -> Path:
    """A config path: as given from the current directory, else beside the experiment file or one of its parents."""
    if not isinstance(value, str) or not value:
        raise SpecError(f"{spec_path}: {where} must be a config file path, got {value!r}")
    if Path(value).is_absolute():
        candidates = [Path(value)]
    else:
        candidates = [Path.cwd() / value] + [d / value for d in [spec_path.parent, *spec_path.parent.parents]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise SpecError(f"{spec_path}: {where}: no config file {value!r} (looked in the current directory and beside the experiment file)")


def _paths(value: Any, where: str, spec_path: Path) -> list[Path]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SpecError(f"{spec_path}: {where} lists no config file")
    return [_resolve_path(v, where, spec_path) for v in items]


def _check_key(key: Any, where: str, spec_path: Path) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise SpecError(f"{spec_path}: {where}: {key!r} is not a dotted fit key such as trainer.max_steps")
    for reserved in RESERVED_KEYS:
        if key == reserved or key.startswith(reserved + "."):
            raise SpecError(
                f"{spec_path}: {where}: {key} is set by the runner for every cell (its own directory, CSV logger, "
                "checkpoint and test scores); remove it"
            )
    return key


def _overrides(value: Any, where: str, spec_path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{spec_path}: {where} must be a mapping of dotted fit keys to values, got {type(value).__name__}")
    return {_check_key(k, where, spec_path): v for k, v in value.items()}


def _label(value: Any, axis: str, spec_path: Path) -> str:
    label = str(value).lower() if isinstance(value, bool) else str(value)
    if not _LABEL.match(label):
        raise SpecError(
            f"{spec_path}: axis {axis!r}: label {label!r} cannot name a cell directory; use letters, digits, '.', '_', '+', '-' "
            "(give the values as a mapping label -> value)"
        )
    return label


def _labelled(values: Any, axis: str, spec_path: Path) -> dict[str, Any]:
    """A list (label = the value) or a mapping label -> value, as an ordered mapping with unique labels."""
    if isinstance(values, dict):
        items = [(_label(k, axis, spec_path), v) for k, v in values.items()]
    elif isinstance(values, list):
        items = [(_label(v, axis, spec_path), v) for v in values]
    else:
        raise SpecError(f"{spec_path}: axis {axis!r}: values must be a list or a mapping label -> value")
    if not items:
        raise SpecError(f"{spec_path}: axis {axis!r} has no values")
    labels = [k for k, _ in items]
    duplicates = sorted({k for k in labels if labels.count(k) > 1})
    if duplicates:
        raise SpecError(f"{spec_path}: axis {axis!r}: labels {duplicates} appear twice")
    return dict(items)


def _axis(name: str, raw: Any, spec_path: Path) -> Axis:
    if not _LABEL.match(name) or CELL_SEPARATOR in name:
        raise SpecError(f"{spec_path}: axis name {name!r}: use letters, digits, '.', '_', '-' (no '__')")
    if not isinstance(raw, dict):
        raise SpecError(f"{spec_path}: axis {name!r} must be a mapping with kind and values")
    unknown = set(raw) - AXIS_KEYS
    if unknown:
        raise SpecError(f"{spec_path}: axis {name!r}: unknown key(s) {sorted(unknown)}; an axis has {sorted(AXIS_KEYS)}")
    kind = raw.get("kind")
    if kind not in AXIS_KINDS:
        raise SpecError(f"{spec_path}: axis {name!r}: kind must be one of {list(AXIS_KINDS)}, got {kind!r}")
    if kind != "key" and "key" in raw:
        raise SpecError(f"{spec_path}: axis {name!r}: 'key' belongs to kind: key axes")
    if kind != "seed" and "keys" in raw:
        raise SpecError(f"{spec_path}: axis {name!r}: 'keys' belongs to kind: seed axes")
    values = _labelled(raw.get("values"), name, spec_path)
    if kind == "config":
        return Axis(name, kind, list(values), {label: {} for label in values},
                    {label: _paths(v, f"axis {name!r} value {label!r}", spec_path) for label, v in values.items()})
    if kind == "regime":
        bad = [label for label in values if label not in REGIMES]
        if bad:
            raise SpecError(f"{spec_path}: axis {name!r}: unknown regime(s) {bad}; regimes: {list(REGIMES)}")
        return Axis(name, kind, list(values), {label: {} for label in values})
    if kind == "seed":
        keys = raw.get("keys", ["seed_everything"])
        if not isinstance(keys, list) or not keys:
            raise SpecError(f"{spec_path}: axis {name!r}: keys must be a non-empty list of dotted keys")
        keys = [_check_key(k, f"axis {name!r} keys", spec_path) for k in keys]
        for label, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{spec_path}: axis {name!r}: seed {label!r} must be an integer, got {value!r}")
        return Axis(name, kind, list(values), {label: {k: v for k in keys} for label, v in values.items()})
    if kind == "key":
        key = _check_key(raw.get("key"), f"axis {name!r} key", spec_path)
        return Axis(name, kind, list(values), {label: {key: v} for label, v in values.items()})
    if not isinstance(raw.get("values"), dict):
        raise SpecError(f"{spec_path}: axis {name!r}: an overrides axis maps labels to {{dotted key: value}} mappings")
    return Axis(name, kind, list(values), {label: _overrides(v, f"axis {name!r} value {label!r}", spec_path) for label, v in values.items()})


def _rules(raw: Any, what: str, axes: list[Axis], spec_path: Path) -> list[Rule]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SpecError(f"{spec_path}: {what} must be a list of {{name, match}} rules")
    by_name = {a.name: a for a in axes}
    rules = []
    for n, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) - RULE_KEYS or "match" not in item or not isinstance(item.get("name"), str):
            raise SpecError(f"{spec_path}: {what}[{n}] must be {{name: <why>, match: {{axis: label or [labels]}}}}")
        match = item["match"]
        if not isinstance(match, dict) or not match:
            raise SpecError(f"{spec_path}: {what} rule {item['name']!r}: match must map axis names to labels")
        patterns = {}
        for axis, value in match.items():
            if axis not in by_name:
                raise SpecError(f"{spec_path}: {what} rule {item['name']!r}: no axis {axis!r}; axes: {list(by_name)}")
            pats = [str(v).lower() if isinstance(v, bool) else str(v) for v in (value if isinstance(value, list) else [value])]
            for p in pats:
                if not any(fnmatch.fnmatchcase(label, p) for label in by_name[axis].labels):
                    raise SpecError(f"{spec_path}: {what} rule {item['name']!r}: {p!r} matches no label of axis {axis!r} {by_name[axis].labels}")
            patterns[axis] = pats
        rules.append(Rule(item["name"], patterns))
    return rules


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and check an experiment file; every error names the file, the key and what to change."""
    spec_path = Path(path).resolve()
    if not spec_path.is_file():
        raise SpecError(f"no experiment file {path}")
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{spec_path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{spec_path}: an experiment file is a mapping with keys {list(TOP_LEVEL_KEYS)}")
    unknown = set(raw) - set(TOP_LEVEL_KEYS)
    if unknown:
        import difflib

        def hint(k: str) -> str:
            close = difflib.get_close_matches(k, TOP_LEVEL_KEYS, 1)
            return f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k)

        hints = [hint(k) for k in sorted(unknown)]
        raise SpecError(f"{spec_path}: unknown top-level key(s) {', '.join(hints)}; allowed: {list(TOP_LEVEL_KEYS)}")
    name = raw.get("name", spec_path.stem)
    if not isinstance(name, str) or not _LABEL.match(name):
        raise SpecError(f"{spec_path}: name {name!r} must be a directory-safe word")
    raw_axes = raw.get("axes") or {}
    if not isinstance(raw_axes, dict):
        raise SpecError(f"{spec_path}: axes must be a mapping axis name -> {{kind, values}}")
    axes = [_axis(str(n), a, spec_path) for n, a in raw_axes.items()]
    for kind in ("config", "regime", "seed"):
        if sum(a.kind == kind for a in axes) > 1:
            raise SpecError(f"{spec_path}: more than one {kind} axis; an experiment has at most one")
    if "base" not in raw and not any(a.kind == "config" for a in axes):
        raise SpecError(f"{spec_path}: no base config: set base: configs/<name>.yaml or add a kind: config axis")
    base = _paths(raw["base"], "base", spec_path) if "base" in raw else []
    fixed = _overrides(raw.get("fixed"), "fixed", spec_path)
    owner: dict[str, str] = {k: "fixed" for k in fixed}
    for axis in axes:
        keys = {k for o in axis.overrides.values() for k in o}
        for key in sorted(keys):
            if key in owner:
                raise SpecError(f"{spec_path}: {key} is set by both {owner[key]} and axis {axis.name!r}; keep one")
            owner[key] = f"axis {axis.name!r}"
    if any(a.kind == "regime" for a in axes):
        for key in ("data.mode", "data.proportions", "data.curriculum", "trainer.max_steps", "trainer.max_epochs"):
            if owner.get(key, "fixed") != "fixed":
                raise SpecError(f"{spec_path}: {key} is set by {owner[key]} and by the regime axis (derived per cell); remove it from the axis")
        if "data.mode" in fixed:
            raise SpecError(f"{spec_path}: fixed sets data.mode but the regime axis sets it per cell; remove it from fixed")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict) or any(not isinstance(v, (str, int, float)) for v in slurm.values()):
        raise SpecError(f"{spec_path}: slurm must map sbatch options (without '--') to scalar values, e.g. {{time: '02:00:00'}}")
    report = raw.get("report") or {}
    if not isinstance(report, dict):
        raise SpecError(f"{spec_path}: report must be a mapping (see docs/experiments.md)")
    check_report_options(report, [a.name for a in axes], spec_path)
    description = raw.get("description", "")
    return ExperimentSpec(name, spec_path, str(description), base, fixed, axes,
                          _rules(raw.get("include"), "include", axes, spec_path),
                          _rules(raw.get("exclude"), "exclude", axes, spec_path), slurm, report)


def cli_value(value: Any) -> str:
    """A value as one ``fit`` command-line argument (jsonargparse reads it as YAML)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def default_out(spec: ExperimentSpec) -> Path:
    """Where an experiment's cells run unless ``--out`` says otherwise."""
    return Path("runs") / "experiments" / spec.name


DEFAULT_CURVES = {"understanding": "val/vqa/total", "generation": "val/gen/total"}  # VQA and generation probes
CURVE_TASKS = {"understanding": "vqa", "generation": "generation"}
REPORT_KEYS = {"curves", "lines", "bars", "replicates", "thresholds", "compare"}
# Steps until a validation probe first reaches a level (docs/experiments.md): the levels the learned
# tiny recipe reaches, so that learning sooner shows even where the end points agree.
DEFAULT_THRESHOLDS = {"val/vqa/position": 0.9, "val/vqa/total": 0.9, "val/gen/weather_pos": 0.9, "val/gen/total": 0.6}
# The test scores whose mixed-minus-baseline difference ``report`` states in standard errors.
DEFAULT_COMPARE = ["all_turns.total", "generation.faithfulness.total"]


def check_report_options(report: dict, axes: list[str], spec_path) -> None:
    """Reject report options that would silently draw nothing."""
    unknown = set(report) - REPORT_KEYS
    if unknown:
        raise SpecError(f"{spec_path}: report: unknown key(s) {sorted(unknown)}; allowed: {sorted(REPORT_KEYS)}")
    curves = report.get("curves", {})
    if not isinstance(curves, dict) or set(curves) - set(CURVE_TASKS):
        raise SpecError(f"{spec_path}: report.curves maps {sorted(CURVE_TASKS)} to a metrics.csv column, e.g. {DEFAULT_CURVES}")
    for n, line in enumerate(report.get("lines", []) or []):
        if not isinstance(line, dict) or set(line) - {"axis", "metrics", "x"} or line.get("axis") not in axes:
            raise SpecError(f"{spec_path}: report.lines[{n}] must be {{axis: one of {axes}, metrics: [..], x: {{label: number}}}}")
    replicates = report.get("replicates")
    if replicates is not None and replicates not in axes:
        raise SpecError(f"{spec_path}: report.replicates names the axis to average over, one of {axes}; got {replicates!r}")
    bars = report.get("bars", {})
    if not isinstance(bars, dict) or set(bars) - {"metrics"}:
        raise SpecError(f"{spec_path}: report.bars must be {{metrics: [scope.metric, ...]}}")
    thresholds = report.get("thresholds", {})
    if not isinstance(thresholds, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in thresholds.items()):
        raise SpecError(f"{spec_path}: report.thresholds maps a metrics.csv column to a level, e.g. {DEFAULT_THRESHOLDS}")
    compare = report.get("compare", [])
    if not isinstance(compare, list) or not all(isinstance(m, str) and "." in m for m in compare):
        raise SpecError(f"{spec_path}: report.compare lists test scores as scope.metric, e.g. {DEFAULT_COMPARE}")
