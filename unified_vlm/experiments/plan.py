"""From cells to exact ``fit`` command lines, checked against the real ``fit`` parser before anything runs.

Each cell's arguments are parsed by the same LightningCLI parser ``python -m unified_vlm fit`` uses
(nothing is instantiated), so an unknown key, a wrong type or a config that does not parse fails
here, naming the cell. The regime axis is resolved here too: its step counts come from the cell's
own resolved config (docs/paper.md 3.2, 3.3).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml

from unified_vlm.experiments.spec import Cell, ExperimentSpec, SpecError, cli_value

MODE_OF_REGIME = {"mixed": "mixed", "understanding_epoch": "understanding", "understanding_step": "understanding",
                  "generation_epoch": "generation", "generation_step": "generation"}
DEFAULT_MAX_EPOCHS = 1000  # Lightning's when neither max_steps nor max_epochs is set


class CellError(SpecError):
    """One or more cells whose command would not run; the message lists each with what to change."""


@dataclass
class CellPlan:
    """A cell ready to run: its directory, exact ``fit`` arguments and resolved config."""

    cell: Cell
    directory: Path
    overrides: dict[str, Any]
    fit_args: list[str]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.cell.id

    @property
    def checkpoint(self) -> Path:
        return self.directory / "checkpoints" / "last.ckpt"


def runner_args(directory: Path) -> list[str]:
    """What the runner sets for every cell: everything it writes goes under ``directory``."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(directory / "logs"), "name": ""}}
    return [
        "--trainer.default_root_dir", str(directory),
        "--trainer.logger", cli_value(logger),
        "--checkpoint.dirpath", str(directory / "checkpoints"),
        "--test_after_fit", "true",
    ]


def override_args(overrides: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in overrides.items():
        args += [f"--{key}", cli_value(value)]
    return args


def fit_args(configs: list[Path], overrides: dict[str, Any], directory: Path) -> list[str]:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    return args + override_args(overrides) + runner_args(directory)


@lru_cache(maxsize=1)
def fit_parser():
    """The ``fit`` command's LightningCLI parser, built without parsing or instantiating anything."""
    from jsonargparse import Namespace

    from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
    from unified_vlm.lightning_cli import UnifiedCLI, UnifiedTrainer
    from unified_vlm.models.unified import UnifiedVLM

    class _ParserOnly(UnifiedCLI):
        def parse_arguments(self, parser, args) -> None:
            self.config = Namespace(subcommand=None)

        def _set_seed(self) -> None:
            pass

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    return _ParserOnly(UnifiedVLM, UnifiedDataModule, trainer_class=UnifiedTrainer, argv=[],
                       parser_kwargs={"exit_on_error": False}).parser


def parse(args: list[str]):
    """The parsed ``fit`` namespace of ``args`` (``["fit", ...]``); raises ValueError with the parser's message."""
    import contextlib
    import io

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return fit_parser().parse_args(args).fit
    except SystemExit:
        raise ValueError(stderr.getvalue().strip() or "the fit parser rejected the arguments") from None
    except Exception as error:  # jsonargparse's ArgumentError and friends
        raise ValueError(str(error)) from None


def dump(namespace) -> dict[str, Any]:
    """The resolved config as ``fit --print_config`` would write it."""
    from jsonargparse import Namespace

    text = fit_parser().dump(Namespace(subcommand="fit", fit=namespace), skip_link_targets=False, format="yaml")
    return yaml.safe_load(text)["fit"]


def _explain(message: str, known: list[str]) -> str:
    """The parser's message, with a 'did you mean' for unknown keys."""
    unknown = re.findall(r"--([A-Za-z_][\w.]*)", message) if "unrecognized arguments" in message else []
    parent = re.search(r'Parser key "([^"]+)"', message)
    if parent:
        unknown += [f"{parent.group(1)}.{o}" for o in re.findall(r"Option '([^']+)' is not accepted", message)]
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else " (python -m unified_vlm fit --help lists the keys)"
        hints.append(f"fit has no key {key}" + hint)
    return "; ".join(hints) if hints else message


# ------------------------------------------------------------------------------------------ regimes
@lru_cache(maxsize=16)
def _record_counts(data_json: str) -> dict[str, int]:
    """Training records per task of a mixed-mode data section, counted by the DataModule itself
    (so dataset variants that add records are counted as they will be trained)."""
    from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule

    data = json.loads(data_json)
    data.pop("collator", None)
    module = UnifiedDataModule(**data, collator=lambda *a, **k: None)  # setup only needs a collator to exist
    module.setup("fit")
    counts: dict[str, int] = {}
    for task in module.datasets["train"].tasks():
        counts[task] = counts.get(task, 0) + 1
    return counts


def _world_size(trainer) -> int:
    devices = trainer.get("devices")
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, str) and devices.isdigit():
        n = int(devices)
    else:
        n = 1  # "auto" / -1: one process on CPU; set trainer.devices to a number for an exact step count on GPUs
    return n * int(trainer.get("num_nodes") or 1)


def regime_overrides(regime: str, config) -> tuple[dict[str, Any], list[str]]:
    """The ``fit`` overrides that turn a cell's mixed config into ``regime``, and how they were derived.

    ``*_step``: as many optimiser steps as the mixed run. ``*_epoch``: the mixed run's steps times
    the share of its training draws that the regime's tasks make up (by ``data.proportions`` when
    set, else by record counts): the same records, seen as often as the mixed run sees them. With a
    ``data.curriculum``, its stage and the mix after it shrink by their own shares (the stage's
    ``steps`` is overridden). Both set ``trainer.max_epochs: -1`` so that the smaller dataset does not end the run early.
    """
    from unified_vlm.datamodules.curriculum import Curriculum
    from unified_vlm.datamodules.unified_datamodule import MODES

    data, trainer = config["data"], config["trainer"]
    if data["mode"] != "mixed":
        raise ValueError(f"the regime axis starts from a mixed config, but data.mode is {data['mode']!r}; set data.mode: mixed in the base")
    if regime == "mixed":
        return {}, []
    mode, kind = MODE_OF_REGIME[regime], regime.rsplit("_", 1)[1]
    tasks = MODES[mode]
    proportions = dict(data["proportions"]) if data.get("proportions") is not None else None
    max_steps = trainer.get("max_steps") if trainer.get("max_steps") is not None else -1
    max_epochs = trainer.get("max_epochs")
    data_json = json.dumps(data, sort_keys=True, default=str)
    counts: Optional[dict[str, int]] = None
    if proportions is None or max_steps <= 0 or (max_epochs is not None and max_epochs > 0):
        counts = _record_counts(data_json)
    notes = []
    if max_steps > 0:
        steps = max_steps
        notes.append(f"mixed run: trainer.max_steps {max_steps}")
    if max_steps <= 0 or (max_epochs is not None and max_epochs > 0):
        if trainer.get("limit_train_batches") not in (None, 1.0):
            raise ValueError("trainer.limit_train_batches is set: the mixed run's step count is unclear; set trainer.max_steps instead")
        if max_epochs is not None and max_epochs < 0 and max_steps <= 0:
            raise ValueError("the mixed run has no end (max_steps and max_epochs both -1); set trainer.max_steps")
        epochs = max_epochs if max_epochs is not None and max_epochs > 0 else DEFAULT_MAX_EPOCHS
        world, accumulate = _world_size(trainer), int(trainer.get("accumulate_grad_batches") or 1)
        micro = max(1, data["global_batch_size"] // (world * accumulate))
        records = sum(counts.values())
        per_epoch = math.ceil(math.ceil(math.ceil(records / world) / micro) / accumulate)
        by_epochs = epochs * per_epoch
        if max_steps <= 0 or by_epochs < max_steps:
            steps = by_epochs
            notes.append(f"mixed run: {epochs} epoch(s) x ceil({records} records / {data['global_batch_size']}) = {steps} steps")
    if proportions is not None:
        total = sum(proportions.values())
        share = sum(proportions.get(t, 0.0) for t in tasks) / total
        restricted = {t: p for t, p in proportions.items() if t in tasks}
        if sum(restricted.values()) <= 0:
            raise ValueError(f"data.proportions {proportions} gives the {mode} tasks {list(tasks)} no weight: the {regime} run would have no record")
        basis = f"data.proportions {proportions}"
    else:
        total = sum(counts.values())
        share = sum(counts.get(t, 0) for t in tasks) / total
        restricted = None
        basis = f"record counts {counts}"
    if share <= 0:
        raise ValueError(f"the mixed data holds no {mode} record ({basis}): the {regime} run would have no data")
    overrides: dict[str, Any] = {"data.mode": mode}
    curriculum = Curriculum.coerce(data.get("curriculum"))
    warm = min(curriculum.steps, steps)
    if kind == "step":
        target = steps
        notes.append(f"{regime}: {target} steps (equal steps)")
    elif warm:
        # The curriculum draws its own mix for its first steps: the regime sees as many of its
        # records as the mixed run in each stage, so both stages shrink by their own share.
        stage = curriculum.proportions or proportions
        if stage is None:
            warm_share = share
        else:
            warm_share = sum(stage.get(t, 0.0) for t in tasks) / sum(stage.values())
        warm_target = round(warm * warm_share)
        target = max(1, warm_target + round((steps - warm) * share))
        notes.append(f"{regime}: {mode} tasks are {warm_share:.4f} of the curriculum's draws ({stage or basis}) and {share:.4f} "
                     f"of the mixed draws after it ({basis}) -> {warm} x {warm_share:.4f} + {steps - warm} x {share:.4f} = "
                     f"{target} steps (equal epochs), {warm_target} of them the curriculum")
        overrides["data.curriculum"] = {**dataclasses.asdict(curriculum), "steps": warm_target} if warm_target else None
    else:
        target = max(1, round(steps * share))
        notes.append(f"{regime}: {mode} tasks are {share:.4f} of the mixed draws ({basis}) -> {steps} x {share:.4f} = {target} steps (equal epochs)")
    if restricted is not None:
        overrides["data.proportions"] = restricted
    overrides.update({"trainer.max_steps": target, "trainer.max_epochs": -1})
    return overrides, notes


# ------------------------------------------------------------------------------------------ planning
PLACEHOLDER = Path("/__cell_directory__")


@lru_cache(maxsize=512)
def _resolved_text(configs: tuple[Path, ...], overrides_json: str) -> str:
    """The resolved config (YAML, cell directory as ``PLACEHOLDER``) of configs + overrides; cached,
    since parsing costs about a second and many cells share everything but their directory and seed."""
    return yaml.safe_dump(dump(parse(fit_args(list(configs), json.loads(overrides_json), PLACEHOLDER))), sort_keys=False)


def resolve(configs: list[Path], overrides: dict[str, Any], directory: Path, free: set[str] = frozenset()) -> dict[str, Any]:
    """The resolved config of a cell. Keys in ``free`` (integer seeds, whose keys and type another
    cell of the group already passed) are substituted instead of parsed again."""
    parsed = {k: v for k, v in overrides.items() if k not in free}
    fixed_free = {k: overrides[k] for k in sorted(free & set(overrides))}
    text = _resolved_text(tuple(configs), json.dumps({**parsed, **{k: 0 for k in fixed_free}}, default=str))
    config = yaml.safe_load(text.replace(str(PLACEHOLDER), str(directory)))
    for key, value in fixed_free.items():
        _set(config, key, value)
    return config


def plan_cells(spec: ExperimentSpec, out_dir: Path, cells: Optional[list[Cell]] = None) -> list[CellPlan]:
    """Resolve and check every cell (all of them, even with ``--only``, unless ``cells`` is given);
    raises CellError listing every cell that would not run."""
    out_dir = Path(out_dir).resolve()
    seed_axis = next((a for a in spec.axes if a.kind == "seed"), None)
    seed_keys = {k for o in seed_axis.overrides.values() for k in o} if seed_axis else set()
    plans, problems = [], []
    known: list[str] = []
    for cell in spec.cells() if cells is None else cells:
        directory = out_dir / cell.id
        overrides = dict(cell.overrides)
        notes: list[str] = []
        try:
            if cell.regime is not None:
                extra, notes = regime_overrides(cell.regime, resolve(cell.configs, overrides, directory, seed_keys))
                overrides.update(extra)
            config = resolve(cell.configs, overrides, directory, seed_keys)
            plans.append(CellPlan(cell, directory, overrides, fit_args(cell.configs, overrides, directory), config, list(notes)))
        except (ValueError, TypeError, OSError) as error:
            if not known:
                try:
                    known = sorted(parse(fit_args(cell.configs, {}, directory)).keys())
                except ValueError:
                    known = []
            problems.append(f"cell {cell.id} (configs {', '.join(str(c) for c in cell.configs)}): {_explain(str(error), known)}")
    if problems:
        raise CellError(f"{spec.path}: {len(problems)} cell(s) would not run; change the experiment file:\n  " + "\n  ".join(problems))
    return plans


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value
