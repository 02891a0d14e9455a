"""``python -m unified_vlm evaluate RUN_DIR``: score every saved checkpoint of a run, one row each.

What the paper did over its checkpoint series (docs/paper.md 3.2, 5.1), in one command: each
checkpoint in ``RUN_DIR/checkpoints`` (or only ``last.ckpt``) is tested with the run's own
``config.yaml`` (VQA, generation faithfulness and Fréchet distance, captions: the
``EvaluationReport``), each into ``RUN_DIR/evaluation/<checkpoint>/test_scores.json``, and the
rows go to ``RUN_DIR/evaluation.csv`` and ``evaluation.json``. A checkpoint whose scores exist
and are newer than it is not scored again, so an interrupted evaluation resumes. Extra
arguments go to ``test`` (e.g. ``--model.sampling.cfg_scale 3.0``).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Optional, Sequence

from unified_vlm.files import write_json_atomically

SCORES_FILE = "test_scores.json"


class EvaluateError(ValueError):
    """A run directory or test file that cannot be evaluated; the message says what to change."""


def checkpoints_of(run_dir: Path, which: str) -> list[Path]:
    """The run's checkpoints, ordered by training step (``last.ckpt`` last)."""
    folder = run_dir / "checkpoints"
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if which == "last":
        found = [p for p in found if p.name == "last.ckpt"]
    if not found:
        raise EvaluateError(
            f"{run_dir} has no {'last.ckpt' if which == 'last' else 'checkpoint'} in {folder}: "
            "point at a run directory written by `python -m unified_vlm fit` (it holds config.yaml and checkpoints/); "
            "to keep a series, fit with --checkpoint.every_n_train_steps N --checkpoint.save_top_k -1"
        )

    def order(path: Path) -> tuple[int, int]:
        match = re.search(r"step=(\d+)", path.name)
        return (1, 0) if path.name == "last.ckpt" else (0, int(match.group(1)) if match else 0)

    return sorted(found, key=order)


def check_test_records(path: Optional[str], need_generation: bool, allow_outside_root: bool = False) -> None:
    """A LLaVA-schema test file must load (its images inside its folder unless ``allow_outside_root``,
    each readable) and, for generation metrics, hold generation records."""
    if path is None:
        return
    from unified_vlm.datamodules.records import RecordError, load_located_records

    try:
        records = [record for _, record in load_located_records(path, allow_outside_root=allow_outside_root)]
    except (RecordError, OSError) as err:
        hint = "" if allow_outside_root or "outside" not in str(err) else \
            " (a file you trust whose images live elsewhere: pass --allow-images-outside-root)"
        raise EvaluateError(f"--test-records: {err}{hint}") from err
    if need_generation and not any(r.get("task") == "generation" for r in records):
        raise EvaluateError(
            f"{path} has no generation records, so no generation metric can be computed: add records with "
            "task 'generation', or pass --skip-generation to score understanding only"
        )


def checkpoint_step(path: Path) -> Optional[int]:
    """The training step a checkpoint was saved at, read with tensors and plain data only (a checkpoint
    that would run code, or a truncated one, is refused naming the file)."""
    from unified_vlm.files import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(path, mmap=True)
    except CheckpointError as err:
        raise EvaluateError(str(err)) from None
    return int(state.get("global_step", 0)) if isinstance(state, dict) else None


def flat_row(scores: dict) -> dict:
    """The numbers of one ``test_scores.json`` as flat columns (per-question results left out)."""
    from unified_vlm.callbacks.evaluation_report import flat_metrics

    summary = dict(scores.get("summary", {}))
    summary.update({k: v for k, v in scores.items() if k not in ("summary", "results")})
    return flat_metrics(summary)


def evaluate_run(run_dir: str | Path, which: str = "all", test_records: Optional[str] = None,
                 skip_generation: bool = False, extra_args: Sequence[str] = (),
                 allow_images_outside_root: bool = False) -> list[dict]:
    """Test each checkpoint of ``run_dir``; returns the rows written to ``evaluation.csv``/``.json``."""
    from unified_vlm.files import CheckpointError
    from unified_vlm.lightning_cli import run_lightning_cli

    run = Path(run_dir)
    config = run / "config.yaml"
    if not config.is_file():
        raise EvaluateError(f"{config} not found: evaluate needs the config.yaml that fit saves in its run directory")
    check_test_records(test_records, need_generation=not skip_generation, allow_outside_root=allow_images_outside_root)
    rows = []
    for ckpt in checkpoints_of(run, which):
        out = run / "evaluation" / ckpt.stem
        scores = out / SCORES_FILE
        if not (scores.is_file() and scores.stat().st_mtime >= ckpt.stat().st_mtime):
            args = ["test", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(out), "--report.scores_file", SCORES_FILE]
            if test_records is not None:
                args += ["--data.test_records", test_records]
                if allow_images_outside_root:
                    args += ["--data.allow_images_outside_root", "true"]
            if skip_generation:
                args += ["--report.reader", "null"]
            try:
                run_lightning_cli(args + list(extra_args))
            except CheckpointError as err:
                raise EvaluateError(str(err)) from None
        row = {"checkpoint": ckpt.name, "step": checkpoint_step(ckpt)}
        row.update(flat_row(json.loads(scores.read_text())))
        rows.append(row)
    write_rows(run, rows)
    return rows


def write_rows(run: Path, rows: list[dict]) -> None:
    write_json_atomically(run / "evaluation.json", rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    tmp = run / "evaluation.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(run / "evaluation.csv")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Score every checkpoint of a run directory (or only last.ckpt); one row per checkpoint."""
    p = argparse.ArgumentParser(prog="python -m unified_vlm evaluate", description=main.__doc__,
                                epilog="Other arguments go to `test`, e.g. --model.sampling.cfg_scale 3.0")
    p.add_argument("run_dir", help="a run directory written by fit (config.yaml, checkpoints/)")
    p.add_argument("--checkpoints", choices=("all", "last"), default="all")
    p.add_argument("--test-records", default=None, help="a LLaVA-schema test file instead of the config's test split")
    p.add_argument("--skip-generation", action="store_true", help="understanding and captions only (no watch reader)")
    p.add_argument("--allow-images-outside-root", action="store_true",
                   help="--test-records is trusted: its images may lie outside its folder (absolute paths, .., symlinks)")
    args, extra = p.parse_known_args(argv)
    try:
        rows = evaluate_run(args.run_dir, args.checkpoints, args.test_records, args.skip_generation, extra,
                            args.allow_images_outside_root)
    except EvaluateError as err:
        p.error(str(err))
    print(f"scored {len(rows)} checkpoint(s): {Path(args.run_dir) / 'evaluation.csv'}")
    keys = [k for k in ("all_turns/total", "first_turn/total", "generation/faithfulness/total", "generation/frechet/fd",
                        "captions/total/precision") if any(k in r for r in rows)]
    print("checkpoint".ljust(28) + "step".rjust(8) + "".join(k.rjust(32) for k in keys))
    for r in rows:
        print(r["checkpoint"].ljust(28) + str(r["step"]).rjust(8)
              + "".join((f"{r[k]:.4f}" if isinstance(r.get(k), float) else "-").rjust(32) for k in keys))
    return 0
