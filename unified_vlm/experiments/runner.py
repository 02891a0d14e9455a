"""``python -m unified_vlm experiment FILE``: run every cell of an experiment, resumably.

Each cell is an ordinary ``python -m unified_vlm fit`` subprocess in ``<out>/<cell-id>/``. Finished
cells (done marker and scores present) are skipped, interrupted ones resume from
``checkpoints/last.ckpt``, a failing cell is recorded in ``failed.json`` and the others go on.
A SIGTERM (or Ctrl-C) to the runner is passed on to the running ``fit`` children, which save
``last.ckpt`` and stop; the runner waits for them, records each as interrupted
(``interrupted.json``, resumable: not failed) and exits 143 (130 for Ctrl-C).
``--workers N`` runs N cells side by side, each with its share of the CPU threads;
``--emit-slurm`` writes a job array that runs the same single-cell command per array task.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import yaml

from unified_vlm.experiments import results
from unified_vlm.experiments.plan import CellPlan, plan_cells
from unified_vlm.experiments.spec import ExperimentSpec, SpecError, default_out, load_spec, select

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
INTERRUPTED = "interrupted.json"


class RunnerInterrupted(KeyboardInterrupt):
    """The runner received a stop signal (SIGTERM); its running cells were stopped and recorded."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def command(plan: CellPlan, resume: bool) -> list[str]:
    """The cell's exact command: ``fit`` with its overrides (and ``--ckpt_path`` when resuming)."""
    args = [sys.executable, "-m", "unified_vlm", *plan.fit_args]
    return args + (["--ckpt_path", str(plan.checkpoint)] if resume else [])


def changed(plan: CellPlan) -> bool:
    """Whether the cell's last recorded command differs from the one the experiment file gives now."""
    path = plan.directory / "cell.json"
    if not path.is_file():
        return False
    recorded = json.loads(path.read_text()).get("command", [])
    if "--ckpt_path" in recorded:
        at = recorded.index("--ckpt_path")
        recorded = recorded[:at] + recorded[at + 2:]
    return recorded[1:] != command(plan, resume=False)[1:]  # the interpreter path may differ


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, payload) -> None:
    from unified_vlm.files import write_json_atomically

    write_json_atomically(path, payload)


def _log_tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def earlier_running_time(directory: Path) -> tuple[float, int]:
    """Seconds and runs recorded by the cell's last interrupted or failed run (0, 0 when none was
    recorded, e.g. after a hard kill), so that a resumed cell's record gives its whole cost."""
    for name in (INTERRUPTED, results.FAILED):
        path = directory / name
        if path.is_file():
            try:
                record = json.loads(path.read_text())
                return float(record.get("seconds_total", record.get("seconds", 0.0))), int(record.get("runs", 1))
            except (ValueError, TypeError, AttributeError):
                return 0.0, 0  # a torn or hand-edited record: count from here
    return 0.0, 0


class Runner:
    """Runs planned cells with ``workers`` side by side; Ctrl-C or SIGTERM stops the running cells (they
    save ``last.ckpt`` and resume next time)."""

    STOP_TIMEOUT = 120.0  # seconds a stopped fit may take to finish its step and save last.ckpt

    def __init__(self, workers: int = 1, threads: Optional[int] = None, echo=print) -> None:
        if workers < 1:
            raise SpecError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.threads = threads or max(1, available_cpus() // workers)
        self.echo = echo
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({v: str(self.threads) for v in THREAD_VARIABLES})
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def run_cell(self, plan: CellPlan) -> str:
        """Run one cell to the end; returns its final state (``done`` or ``failed``)."""
        directory = plan.directory
        directory.mkdir(parents=True, exist_ok=True)
        prior = results.state(directory)
        if prior == "done":
            return "done"
        resume = plan.checkpoint.is_file()
        cmd = command(plan, resume)
        earlier_seconds, earlier_runs = earlier_running_time(directory) if resume else (0.0, 0)
        (directory / results.FAILED).unlink(missing_ok=True)
        (directory / INTERRUPTED).unlink(missing_ok=True)
        _write_json(directory / "cell.json", {
            "id": plan.id, "labels": plan.cell.labels, "overrides": plan.overrides, "notes": plan.notes,
            "command": cmd, "threads": self.threads,
        })
        (directory / "command.sh").write_text(shlex.join(cmd) + "\n")
        (directory / "config.yaml").write_text(yaml.safe_dump(plan.config, sort_keys=False))
        log = directory / "log.txt"
        start = time.time()
        with open(log, "a") as out:
            out.write(f"\n===== {_now()} {'resume from ' + str(plan.checkpoint) if resume else 'start'}: {shlex.join(cmd)}\n")
            out.flush()
            with self._lock:  # never start a cell once stop() has begun
                if self._stopping:
                    out.write(f"===== {_now()} not started: the runner was stopped\n")
                    return "interrupted"
                process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.environment(), cwd=os.getcwd())
                self._running.add(process)
            try:
                rc = process.wait()
            finally:
                with self._lock:
                    self._running.discard(process)
        seconds = round(time.time() - start, 1)
        # what the cell cost over all its runs (an interrupted cell resumes, maybe several times)
        timing = {"seconds": seconds, "seconds_total": round(earlier_seconds + seconds, 1), "runs": earlier_runs + 1}
        scores = results.latest_scores(directory)
        if rc == 0 and scores is not None:
            shutil.copyfile(scores, directory / results.SCORES)
            results.write_metrics(results.merged_metrics(directory), directory / results.METRICS)
            state, record = "done", {"finished": _now(), **timing, "resumed": resume, "command": cmd}
        elif rc < 0 or rc in (130, 143):
            state, record = "interrupted", {"interrupted": _now(), "exit_status": rc, **timing, "log": str(log),
                                            "checkpoint": str(plan.checkpoint) if plan.checkpoint.is_file() else None}
        else:
            reason = f"exit status {rc}" if rc else "fit exited 0 but wrote no test_scores.json"
            state, record = "failed", {"failed": _now(), "reason": reason, **timing, "log": str(log),
                                       "command": cmd, "log_tail": _log_tail(log)}
        with open(log, "a") as out:
            out.write(f"===== {_now()} {state} after {seconds} s ({timing['seconds_total']} s over {timing['runs']} run(s))\n")
        # the state file last: a cell is "done" only once everything else about it is written
        _write_json(directory / {"done": results.DONE, "interrupted": INTERRUPTED, "failed": results.FAILED}[state], record)
        return state

    def run(self, plans: list[CellPlan]) -> dict[str, str]:
        """Run the cells that are not done; returns cell id -> final state."""
        outcome = {p.id: "done" for p in plans if results.state(p.directory) == "done"}
        todo = [p for p in plans if p.id not in outcome]
        if outcome:
            self.echo(f"{len(outcome)} cell(s) already done, skipped")
        for plan in plans:
            if plan.id in outcome and changed(plan):
                self.echo(f"warning: {plan.id} is done with a different command than the experiment file gives now; "
                          f"delete {plan.directory} to run it again")
        if not todo:
            return outcome
        self.echo(f"running {len(todo)} cell(s), {self.workers} at a time, {self.threads} thread(s) each")
        counter = iter(range(1, len(todo) + 1))

        def one(plan: CellPlan) -> tuple[str, str]:
            state = results.state(plan.directory)
            self.echo(f"[{next(counter)}/{len(todo)}] {plan.id}: {'resuming' if state == 'resume' else 'starting'}")
            start = time.time()
            final = self.run_cell(plan)
            where = "" if final == "done" else f" (log: {plan.directory / 'log.txt'})"
            self.echo(f"{plan.id}: {final} after {time.time() - start:.1f} s{where}")
            return plan.id, final

        pool = ThreadPoolExecutor(max_workers=self.workers)
        try:
            for cell_id, final in pool.map(one, todo):
                outcome[cell_id] = final
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return outcome

    def stop(self) -> None:
        """Send SIGTERM to the cells this runner started and wait for them: each saves ``last.ckpt`` at
        the end of its step and exits (it resumes from there next time). One that takes longer than
        ``STOP_TIMEOUT`` seconds is killed. No new cell starts afterwards."""
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for process in running:
            process.terminate()
        deadline = time.time() + self.STOP_TIMEOUT
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()


# ------------------------------------------------------------------------------------------ SLURM
def slurm_script(spec: ExperimentSpec, plans: list[CellPlan], out_dir: Path) -> str:
    """A job array, one task per cell, each running this command for its cell (``--cell ID``)."""
    out_dir = Path(out_dir).resolve()
    lines = [
        "#!/bin/bash",
        f"# Experiment {spec.name}: {len(plans)} cell(s), one array task each. Submit with: sbatch {out_dir / 'slurm.sh'}",
        f"#SBATCH --job-name={spec.name}",
        f"#SBATCH --array=0-{len(plans) - 1}",
        f"#SBATCH --output={out_dir}/slurm-%A_%a.out",
    ]
    lines += [f"#SBATCH --{key}={value}" for key, value in spec.slurm.items()]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        "CELLS=(",
        *[f"  {shlex.quote(p.id)}" for p in plans],
        ")",
        "export TOKENIZERS_PARALLELISM=false",
        f"exec {shlex.quote(sys.executable)} -m unified_vlm experiment {shlex.quote(str(spec.path))} "
        f"--out {shlex.quote(str(out_dir))} --cell \"${{CELLS[$SLURM_ARRAY_TASK_ID]}}\"",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unified_vlm experiment",
        description="Run the cells of an experiment file (configs/experiments/*.yaml); see docs/experiments.md.",
    )
    parser.add_argument("file", help="experiment file, e.g. configs/experiments/tiny_mixed_vs_specific.yaml")
    parser.add_argument("--dry-run", action="store_true", help="check every cell and print its state and exact command; run nothing")
    parser.add_argument("--workers", type=int, default=1, help="cells run side by side (the CPU threads are split among them)")
    parser.add_argument("--threads", type=int, default=None, help="threads per cell (default: available CPUs / workers)")
    parser.add_argument("--only", default=None, help="run only matching cells: comma-separated axis=label globs, e.g. 'regime=mixed,seed=0'")
    parser.add_argument("--cell", default=None, help="run exactly this cell id (what each SLURM array task runs)")
    parser.add_argument("--out", default=None, help="run directory (default runs/experiments/<name>)")
    parser.add_argument("--emit-slurm", default=None, metavar="FILE", help="write a SLURM job-array script (one task per selected cell) and exit")
    parser.add_argument("--archive", default=None, metavar="DIR",
                        help="skip the cells finished in DIR, an archive written by `report --archive` (e.g. a committed "
                             "docs/runs/<name>): a new checkout goes on with the cells that are left")
    return parser


def archived_cells(spec: ExperimentSpec, plans: list[CellPlan], archive: Path) -> set[str]:
    """The ids of the cells not done in the run directory but finished in ``archive`` (``report --archive``'s
    copy, which outlives the run directory). An archive of another experiment is refused."""
    from unified_vlm.experiments.report import EXPERIMENT_FILE, check_archive_owner, snapshot

    if not archive.is_dir():
        raise SpecError(f"--archive {archive}: no such directory (`report FILE --archive DIR` writes one)")
    if not (archive / EXPERIMENT_FILE).is_file():
        raise SpecError(f"--archive {archive}: no {EXPERIMENT_FILE}, so it is not an archive written by `report --archive`")
    try:
        check_archive_owner(archive, snapshot(spec, archive))
    except ValueError as error:
        raise SpecError(f"--archive {error}") from None
    return {p.id for p in plans if results.state(p.directory) != "done" and results.state(archive / p.id) == "done"}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = load_spec(args.file)
        out_dir = Path(args.out) if args.out else default_out(spec)
        cells = spec.cells()
        if args.cell is not None:
            chosen = [c for c in cells if c.id == args.cell]
            if not chosen:
                raise SpecError(f"no cell {args.cell!r} in {spec.path}; --dry-run lists the cells")
            plans = plan_cells(spec, out_dir, chosen)
        else:
            plans = select_plans(plan_cells(spec, out_dir), args.only)
        archived = archived_cells(spec, plans, Path(args.archive)) if args.archive else set()
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.dry_run and args.cell is None:  # array tasks start together: --emit-slurm wrote it already
        from unified_vlm.experiments.report import EXPERIMENT_FILE, snapshot

        _write_json(out_dir / EXPERIMENT_FILE, snapshot(spec, out_dir))
    if archived:
        print(f"{len(archived)} cell(s) finished in the archive {args.archive}, skipped: {', '.join(sorted(archived))}")
        plans = [p for p in plans if p.id not in archived]
    if args.emit_slurm:
        path = Path(args.emit_slurm)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(slurm_script(spec, plans, out_dir))
        print(f"wrote {path}: {len(plans)} array task(s); submit with sbatch {path}")
        return 0
    if args.dry_run:
        print(f"experiment {spec.name}: {len(plans)} cell(s) in {out_dir}")
        for plan in plans:
            state = results.state(plan.directory)
            note = " (done with a different command: delete the directory to rerun)" if state == "done" and changed(plan) else ""
            print(f"\n[{state}] {plan.id}{note}")
            for note in plan.notes:
                print(f"  # {note}")
            print("  " + shlex.join(command(plan, resume=state == "resume")))
        return 0
    try:
        with stop_signals_interrupt():
            outcome = Runner(args.workers, args.threads).run(plans)
    except RunnerInterrupted as stopped:
        print(f"interrupted by {signal.Signals(stopped.signum).name}: the running cells were stopped (each saved "
              "checkpoints/last.ckpt and is recorded in interrupted.json); run the same command again to resume them",
              file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print("interrupted: running cells were stopped; run the same command again to resume them", file=sys.stderr)
        return 130
    outcome.update({cell_id: "done" for cell_id in archived})
    failed = sorted(c for c, s in outcome.items() if s != "done")
    print(f"{len(outcome) - len(failed)}/{len(outcome)} cell(s) done" + (f"; not done: {', '.join(failed)}" if failed else ""))
    out_option = f" --out {shlex.quote(str(out_dir))}" if args.out else ""
    if args.archive:  # adds the new cells to the archive and writes its report, over every archived cell
        print(f"tables and figures: python -m unified_vlm report {shlex.quote(str(spec.path))}{out_option}"
              f" --archive {shlex.quote(str(args.archive))}")
    else:
        print(f"tables and figures: python -m unified_vlm report {shlex.quote(str(spec.path))}{out_option}")
    return 1 if failed else 0


@contextlib.contextmanager
def stop_signals_interrupt():
    """While running cells, a SIGTERM raises ``RunnerInterrupted`` in the main thread (as Ctrl-C raises
    KeyboardInterrupt), so the runner stops its cells instead of dying and leaving them running. Further
    SIGTERMs while stopping are ignored; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        signal.signal(signum, signal.SIG_IGN)  # once: the cells are being stopped
        raise RunnerInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def select_plans(plans: list[CellPlan], pattern: Optional[str]) -> list[CellPlan]:
    chosen = {c.id for c in select([p.cell for p in plans], pattern)}
    return [p for p in plans if p.id in chosen]
