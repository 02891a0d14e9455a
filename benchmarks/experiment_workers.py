"""Wall time of a small experiment matrix run with 1 worker (all threads to one cell) against N
workers (the threads split among cells side by side), on this machine, in one run.

    python benchmarks/experiment_workers.py                        # 5 SigLIP-VQ cells, at most 120 steps each
    python benchmarks/experiment_workers.py --steps 200 --workers 1 2

The cells are those of ``--experiment`` chosen by ``--only``, shortened to ``--steps`` optimiser steps
(one validation at the end) and ``--test-watches`` scored test watches, so that scoring keeps about the
share of a cell it has at full length. Each setting runs the same cells from scratch in its own
temporary directory through ``python -m unified_vlm experiment`` (the runner users run), so the
figure includes process start-up, model building and scoring. Prints a table and the ratio of each
setting's wall time to the first's; asserts nothing. The machine must be otherwise idle.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from unified_vlm.benchmarking import BenchmarkError, run
from unified_vlm.experiments.runner import available_cpus
from unified_vlm.experiments.spec import SpecError, load_spec, select

ROOT = Path(__file__).resolve().parents[1]


def shortened(experiment: Path, steps: int, test_watches: int, out: Path) -> Path:
    """A copy of ``experiment`` whose cells train ``steps`` steps and score ``test_watches`` watches;
    relative config paths are made absolute so that the copy can live anywhere."""
    raw = yaml.safe_load(experiment.read_text())
    for axis in raw.get("axes", {}).values():
        if axis.get("kind") == "config":
            axis["values"] = {k: str((ROOT / v).resolve()) for k, v in axis["values"].items()}
    if "base" in raw:
        raw["base"] = str((ROOT / raw["base"]).resolve())
    curriculum = max(1, steps // 4)  # the shipped curriculum is a quarter of the schedule (600 of 2,400)
    raw.setdefault("fixed", {}).update({
        "trainer.max_steps": steps, "trainer.val_check_interval": steps, "data.num_test_watches": test_watches,
        "data.curriculum.steps": curriculum, "trainer.enable_progress_bar": False,
    })
    path = out / experiment.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="configs/experiments/tiny_learned_mixed_vs_specific.yaml")
    p.add_argument("--only", default="architecture=siglip_vq,seed=0",
                   help="the cells (default: one seed of SigLIP-VQ's five regimes, as the 5.1 matrix runs them)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--test-watches", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    experiment = Path(args.experiment)
    if not experiment.is_file():
        raise BenchmarkError(f"--experiment {experiment}: no such file; the shipped ones are in configs/experiments/")
    try:
        cells = select(load_spec(experiment).cells(), args.only)
    except SpecError as error:
        raise BenchmarkError(f"--experiment {experiment}: {error}") from error
    cpus = available_cpus()
    if any(w < 1 or w > cpus for w in args.workers):
        raise BenchmarkError(f"--workers {args.workers}: each must be between 1 and the {cpus} available CPUs")
    print(f"{len(cells)} cell(s) of {experiment.name} ({args.only}), {args.steps} steps each, {cpus} CPUs")
    rows = []
    with tempfile.TemporaryDirectory(prefix="workers-") as tmp:
        spec = shortened(experiment, args.steps, args.test_watches, Path(tmp))
        for workers in args.workers:
            threads = max(1, cpus // workers)
            out = Path(tmp) / f"w{workers}"
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "unified_vlm", "experiment", str(spec), "--only", args.only,
                                   "--workers", str(workers), "--threads", str(threads), "--out", str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise BenchmarkError(f"--workers {workers}: the experiment failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
            rows.append((workers, threads, wall))
            print(f"  workers {workers} x {threads} thread(s): {wall:.1f} s", flush=True)
    first = rows[0][2]
    print("\n| workers | threads per cell | matrix wall time | against the first |\n| ---: | ---: | ---: | ---: |")
    for workers, threads, wall in rows:
        print(f"| {workers} | {threads} | {wall:.1f} s | {wall / first:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    run(main)
