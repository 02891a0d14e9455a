"""``test`` / ``predict`` without ``--ckpt_path`` would score an untrained model as if trained:
refused, unless ``--untrained true`` asks for it (smoke tests)."""
from __future__ import annotations

import pytest

from test_cli import MAIN_CONFIG, tiny_overrides
from unified_vlm.cli import main


@pytest.mark.parametrize("command", ["test", "predict"])
def test_without_a_checkpoint_is_refused(tmp_path, tiny_vq_dir, capsys, command):
    tiny = tiny_overrides(tmp_path, tiny_vq_dir)
    out = tmp_path / "out"
    assert main([command, "--config", str(MAIN_CONFIG), "--config", str(tiny), "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{command} without --ckpt_path would use an untrained model" in err and "--untrained true" in err
    assert not (out / "test_scores.json").exists() and not (out / "predictions").exists()


def test_untrained_true_runs_the_untrained_model_on_purpose(tmp_path, tiny_vq_dir):
    tiny = tiny_overrides(tmp_path, tiny_vq_dir)
    out = tmp_path / "out"
    assert main(["test", "--config", str(MAIN_CONFIG), "--config", str(tiny), "--untrained", "true",
                 "--trainer.logger", "false", "--trainer.default_root_dir", str(out), "--report.reader", "null"]) == 0
    assert (out / "test_scores.json").is_file()
