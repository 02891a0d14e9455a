"""A scheduler's SIGTERM (SLURM sends it before killing a job): ``fit`` saves ``last.ckpt``, exits
non-zero and says how to resume; the resumed run finishes."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from test_cli import MAIN_CONFIG, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class AnnounceSteps(L.Callback):
    """Prints ``STEP <n>`` after every optimizer step (rank 0 only: two ranks writing one pipe
    interleave their lines), so a test knows training is under way."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0:
            print(f"STEP {trainer.global_step}", flush=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        print(f"RANK {trainer.global_rank} STOPPED BY {type(exception).__name__}", flush=True)


def environment() -> dict:
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def tiny_fit(tmp_path: Path, vq_dir: str, max_steps: int, **trainer) -> list[str]:
    tiny = tiny_overrides(tmp_path, vq_dir)
    raw = yaml.safe_load(tiny.read_text())
    raw["trainer"].update({"max_steps": max_steps, "val_check_interval": 1000, "limit_val_batches": 0,
                           "callbacks": [{"class_path": "test_signals.AnnounceSteps"}], **trainer})
    raw["data"]["num_train_watches"] = 64
    raw["test_after_fit"] = False
    raw["vqa_probe"] = {"max_records": 0}
    raw["generation_probe"] = {"max_images": 0}
    tiny.write_text(yaml.safe_dump(raw))
    return ["fit", "--config", str(MAIN_CONFIG), "--config", str(tiny)]


def run_and_signal(args: list[str], after_step: int, signum: int = signal.SIGTERM, timeout: float = 240) -> tuple[int, str]:
    """Runs ``python -m unified_vlm *args``, sends ``signum`` once it has printed ``STEP after_step``."""
    process = subprocess.Popen([sys.executable, "-m", "unified_vlm", *args], cwd=ROOT, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.time() + timeout
    try:
        for line in process.stdout:
            lines.append(line)
            if any(int(step) >= after_step for step in re.findall(r"STEP (\d+)", line)):
                process.send_signal(signum)
                break
            assert time.time() < deadline, "no training step in time:\n" + "".join(lines[-40:])
        rest, _ = process.communicate(timeout=timeout)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, "".join(lines) + rest


def test_sigterm_saves_last_ckpt_exits_nonzero_and_the_run_resumes(tmp_path, tiny_vq_dir):
    rc, output = run_and_signal(tiny_fit(tmp_path, tiny_vq_dir, max_steps=500), after_step=3)
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert rc == 143, output[-3000:]
    assert last.is_file(), output[-3000:]
    assert not list(last.parent.glob("*.part"))
    assert f"--ckpt_path {last}" in output and "stopped by SIGTERM at step" in output
    saved = torch.load(last, map_location="cpu", weights_only=True)
    stopped_at = saved["global_step"]
    assert 3 <= stopped_at < 500

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    done = subprocess.run([sys.executable, "-m", "unified_vlm", *tiny_fit(resumed, tiny_vq_dir, max_steps=stopped_at + 2),
                           "--ckpt_path", str(last)], cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("STEP")] == [f"STEP {stopped_at + 1}", f"STEP {stopped_at + 2}"]
    final = torch.load(resumed / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == stopped_at + 2


def test_sigterm_under_ddp_stops_both_ranks_at_one_step_with_a_checkpoint(tmp_path, tiny_vq_dir):
    """SIGTERM to rank 0 (as a user's kill): forwarded to rank 1, both save together and stop non-zero."""
    args = tiny_fit(tmp_path, tiny_vq_dir, max_steps=500) + [
        "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    rc, output = run_and_signal(args, after_step=3)
    assert rc == 143, output[-3000:]
    assert "RANK 0 STOPPED BY TrainingInterrupted" in output and "RANK 1 STOPPED BY TrainingInterrupted" in output, output[-3000:]
    saved = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] >= 3
