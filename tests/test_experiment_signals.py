"""A SIGTERM to ``experiment`` (SLURM's stop) reaches its running ``fit``: the runner passes it on,
waits for the cell to save ``last.ckpt``, records it as interrupted (resumable, not failed) and
exits non-zero; no ``fit`` is left running and writing into the cell."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from test_signals import ROOT, environment

from test_cli import MAIN_CONFIG, tiny_overrides
from unified_vlm.experiments import results
from unified_vlm.experiments.runner import INTERRUPTED


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").is_file() else ""
        found += [int(c) for c in text.split()]
    return found


def running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()
    except OSError:
        return False


def test_sigterm_to_the_runner_stops_its_fit_and_records_the_cell_as_interrupted(tmp_path, tiny_vq_dir):
    tiny = tiny_overrides(tmp_path, tiny_vq_dir, MAIN_CONFIG)
    experiment = {
        "name": "one_cell",
        "base": [str(MAIN_CONFIG), str(tiny)],
        "fixed": {"trainer.max_steps": 500, "trainer.val_check_interval": 1000, "trainer.limit_val_batches": 0,
                  "vqa_probe.max_records": 0, "generation_probe.max_images": 0, "data.num_train_watches": 64,
                  "trainer.callbacks": [{"class_path": "test_signals.AnnounceSteps"}]},
        "axes": {"variant": {"kind": "overrides", "values": {"ok": {}}}},
    }
    spec = tmp_path / "one_cell.yaml"
    spec.write_text(yaml.safe_dump(experiment, sort_keys=False))
    out = tmp_path / "run"
    cell = out / "variant=ok"
    fits: list[int] = []
    runner = subprocess.Popen([sys.executable, "-m", "unified_vlm", "experiment", str(spec), "--out", str(out)],
                              cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while "STEP 2\n" not in ((cell / "log.txt").read_text() if (cell / "log.txt").is_file() else ""):
            assert runner.poll() is None and time.time() < deadline, runner.communicate()[0][-3000:]
            time.sleep(0.5)
        fits = children(runner.pid)
        assert fits, "the cell's fit is not a child of the runner"
        runner.send_signal(signal.SIGTERM)
        printed, _ = runner.communicate(timeout=240)
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in fits:  # never leave a fit behind, also when the test fails
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert runner.returncode == 143, printed[-3000:]
    assert "interrupted by SIGTERM" in printed
    assert not [pid for pid in fits if running(pid)], "fit is still running after the runner exited"
    log = (cell / "log.txt").read_text()
    assert "fit stopped by SIGTERM at step" in log, log[-3000:]
    assert not (cell / results.FAILED).exists()
    record = json.loads((cell / INTERRUPTED).read_text())
    assert record["exit_status"] == 143 and record["checkpoint"] == str(cell / "checkpoints" / "last.ckpt")
    assert record["runs"] == 1 and record["seconds_total"] == record["seconds"] > 0
    assert results.state(cell) == "resume"
