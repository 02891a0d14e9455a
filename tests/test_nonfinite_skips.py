"""``--nonfinite.action skip`` is capped: a run that skips most of its batches stops instead of
finishing with exit 0 and a checkpoint; the number skipped is reported at the end."""
from __future__ import annotations

import pytest
from test_checkpoint_safety import PoisonOnce, config

from unified_vlm.callbacks import NonFiniteLossError, NonFiniteLossGuard
from unified_vlm.cli import main


class PoisonFrom(PoisonOnce):
    """A NaN loss at every step from ``step`` on (the inputs are poisoned, the weights are not)."""

    def poisoned(self, trainer) -> bool:
        return trainer.global_step >= self.step


def test_skipping_most_batches_stops_the_run(tmp_path, tiny_vq_dir):
    poison = {"class_path": "test_nonfinite_skips.PoisonFrom", "init_args": {"step": 1}}
    with pytest.raises(NonFiniteLossError, match=r"4 of 5 training batches had a non-finite loss, more than "
                                                 r"nonfinite.max_skip_fraction=0.1"):
        main(config(tmp_path, tiny_vq_dir, "most", callbacks=[poison], max_steps=6, val_check_interval=6)
             + ["--nonfinite.action", "skip"])
    assert not (tmp_path / "most" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_the_skipped_count_is_reported_at_the_end(tmp_path, tiny_vq_dir):
    poison = {"class_path": "test_checkpoint_safety.PoisonOnce", "init_args": {"step": 1}}
    with pytest.warns(UserWarning, match=r"1 of 4 training batches had a non-finite loss and were skipped"):
        main(config(tmp_path, tiny_vq_dir, "one", callbacks=[poison]) + ["--nonfinite.action", "skip"])


def test_the_cap_options_are_checked():
    with pytest.raises(ValueError, match="max_skip_fraction must be in"):
        NonFiniteLossGuard("skip", max_skip_fraction=1.5)
    guard = NonFiniteLossGuard("skip")
    guard.load_state_dict({"skipped": 2, "seen": 40})
    assert guard.state_dict() == {"skipped": 2, "seen": 40}
