"""What a cell leaves behind, read back: its state, its test scores and its training log.

A cell directory holds ``cell.json`` (labels, overrides, command), ``config.yaml`` (resolved),
``log.txt``, ``checkpoints/last.ckpt``, ``logs/version_N/`` (one CSV-logger version per attempt),
and once finished ``test_scores.json``, ``metrics.csv`` (all attempts merged) and ``done.json``.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

DONE, FAILED, SCORES, METRICS = "done.json", "failed.json", "test_scores.json", "metrics.csv"
KEPT = ("cell.json", "config.yaml", DONE, METRICS)  # what an archived cell keeps besides its scores


def state(directory: Path) -> str:
    """``done`` (done marker and scores), ``failed``, ``resume`` (a last checkpoint) or ``new``."""
    if (directory / DONE).is_file() and (directory / SCORES).is_file():
        return "done"
    if (directory / FAILED).is_file():
        return "failed"
    if (directory / "checkpoints" / "last.ckpt").is_file():
        return "resume"
    return "new"


def versions(directory: Path) -> list[Path]:
    """The CSV logger's version directories, oldest attempt first."""
    found = []
    for path in (directory / "logs").glob("version_*"):
        match = re.fullmatch(r"version_(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_scores(directory: Path) -> Optional[Path]:
    """The newest attempt's ``test_scores.json``."""
    for version in reversed(versions(directory)):
        if (version / SCORES).is_file():
            return version / SCORES
    return None


def _number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a Lightning ``metrics.csv`` with the empty cells left out."""
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            values = {k: _number(v) for k, v in row.items() if k is not None}
            rows.append({k: v for k, v in values.items() if v is not None})
    return rows


def merged_metrics(directory: Path) -> list[dict[str, float]]:
    """Every attempt's logged rows in step order: a resumed attempt restarts at its checkpoint, so
    an earlier attempt's rows from that step on (work that was redone) are dropped."""
    attempts = [read_csv(v / METRICS) for v in versions(directory) if (v / METRICS).is_file()]
    attempts = [rows for rows in attempts if rows]
    if not attempts:
        return read_csv(directory / METRICS) if (directory / METRICS).is_file() else []
    merged: list[dict[str, float]] = []
    for n, rows in enumerate(attempts):
        later = [r["step"] for nxt in attempts[n + 1:] for r in nxt if "step" in r]
        cut = min(later) if later else math.inf
        merged += [r for r in rows if r.get("step", -1) < cut]
    return merged


def write_metrics(rows: list[dict[str, float]], path: Path) -> None:
    keys = sorted({k for r in rows for k in r})
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


# Numbers in a scores file that describe how a metric was computed, not a result.
SETTINGS = {"level", "bootstrap", "bootstrap_bias", "image_size", "requested"}


def flatten_scores(payload: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a scores file as ``scope.metric`` (``summary.`` dropped; per-item
    ``results`` lists, ``count*``/``n_*`` fields and ``SETTINGS`` are not metrics), so new metric groups (e.g. a
    ``generation`` key) appear in the report without code changes."""
    out: dict[str, float] = {}
    if isinstance(payload, dict):
        for key, value in payload.items():
            if key == "results" or str(key).startswith(("count", "n_")) or key in SETTINGS:
                continue
            name = f"{prefix}{key}" if prefix or key != "summary" else ""
            out.update(flatten_scores(value, f"{name}." if name else ""))
    elif isinstance(payload, (int, float)) and not isinstance(payload, bool) and prefix:
        if not math.isnan(float(payload)):
            out[prefix.rstrip(".")] = float(payload)
    return out


def without_items(payload: Any) -> Any:
    """A scores payload less its per-item ``results`` lists (what ``flatten_scores`` skips anyway)."""
    if isinstance(payload, dict):
        return {k: without_items(v) for k, v in payload.items() if k != "results"}
    return payload


def archive_cell(source: Path, target: Path) -> None:
    """Copy what the report reads of a finished cell (its record, resolved config, done marker,
    merged training log and scores less per-item results) from ``source`` to ``target``: a few KB
    instead of checkpoints and logs, so a finished cell outlives its run directory."""
    if state(source) != "done":
        raise ValueError(f"{source} is not a finished cell (no {DONE} and {SCORES})")
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    if not (source / METRICS).is_file():  # an older cell: merge its attempts now
        write_metrics(merged_metrics(source), target / METRICS)
    scores = without_items(json.loads((source / SCORES).read_text()))
    (target / SCORES).write_text(json.dumps(scores, indent=2))


def read_scores(directory: Path) -> Optional[dict[str, float]]:
    path = directory / SCORES
    if not path.is_file():
        return None
    return flatten_scores(json.loads(path.read_text()))
