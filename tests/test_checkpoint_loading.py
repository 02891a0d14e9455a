"""Checkpoints a user may have been handed are read safely: one that would run code is refused, a
truncated one is named as such (never a raw PytorchStreamReader error)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from unified_vlm.cli import main
from unified_vlm.experiments.evaluate import EvaluateError, evaluate_run
from unified_vlm.files import CheckpointError, load_checkpoint


class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted(path: Path, marker: Path) -> Path:
    torch.save({"global_step": 7, "hyper_parameters": {}, "payload": RunsCode(marker)}, path)
    return path


def truncated(path: Path) -> Path:
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(4096)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_evaluate_does_not_run_a_crafted_checkpoint_whose_scores_are_fresh(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "code_ran"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    ckpt = crafted(run / "checkpoints" / "last.ckpt", marker)
    scores = run / "evaluation" / "last" / "test_scores.json"
    scores.parent.mkdir(parents=True)
    scores.write_text(json.dumps({"summary": {}}))
    later = time.time() + 10
    os.utime(scores, (later, later))  # newer than the checkpoint: only the step is read from it
    with pytest.raises(EvaluateError, match=rf"{ckpt}: refused to load: it holds objects other than tensors"):
        evaluate_run(run)
    assert not marker.exists(), "loading the checkpoint ran its code"


def test_a_crafted_ckpt_path_is_refused_before_anything_runs(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    ckpt = crafted(tmp_path / "evil.ckpt", marker)
    assert main(["test", "--ckpt_path", str(ckpt), "--trainer.logger", "false"]) == 2
    assert f"{ckpt}: refused to load" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_truncated_ckpt_path_names_the_file(tmp_path, capsys, command):
    ckpt = truncated(tmp_path / "last.ckpt")
    assert main([command, "--ckpt_path", str(ckpt), "--trainer.logger", "false"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt} is truncated or corrupt" in err and "PytorchStreamReader" not in err


def test_the_safe_loader(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 2, "w": torch.ones(2)}, good)
    assert load_checkpoint(good)["global_step"] == 2
    assert load_checkpoint(good, mmap=True)["global_step"] == 2
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt is truncated or corrupt"):
        load_checkpoint(empty)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.ckpt")
