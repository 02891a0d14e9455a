"""Resume, crash and NaN safety of checkpoints, through the CLI."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from test_cli import MAIN_CONFIG, tiny_overrides
from unified_vlm.callbacks import NonFiniteLossError
from unified_vlm.callbacks.checkpoint import non_finite_parameters
from unified_vlm.cli import main


class CrashAtStep(L.Callback):
    """Simulates a killed run: raises before the given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash before step {self.step + 1}")


class PoisonAtStep(L.Callback):
    """Makes the loss NaN from the given step on, by writing a NaN into one weight."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.lm.get_input_embeddings().weight[0, 0] = float("nan")


def config(tmp_path: Path, vq_dir: str, name: str, **trainer) -> list[str]:
    directory = tmp_path / name
    directory.mkdir()
    tiny = tiny_overrides(directory, vq_dir)
    raw = yaml.safe_load(tiny.read_text())
    raw["trainer"].update({"max_steps": 4, "val_check_interval": 2, **trainer})
    raw["data"].update({"num_train_watches": 8})  # 24 records: 6 batches of 4, so the kill is mid-epoch
    raw["test_after_fit"] = False
    raw["vqa_probe"] = {"max_records": 0}
    tiny.write_text(yaml.safe_dump(raw))
    return ["fit", "--config", str(MAIN_CONFIG), "--config", str(tiny)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, tiny_vq_dir):
    main(config(tmp_path, tiny_vq_dir, "straight"))
    straight = weights(tmp_path / "straight" / "version_0" / "checkpoints" / "last.ckpt")

    crash = {"class_path": "test_checkpoint_safety.CrashAtStep", "init_args": {"step": 2}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(config(tmp_path, tiny_vq_dir, "killed", callbacks=[crash]))
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "the step-2 validation left no last.ckpt"  # saved at validation, not only at the end
    assert not list(last.parent.glob("*.part"))  # written beside and renamed into place
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and saved["UnifiedDataModule"]["records_consumed"] == 8

    main(config(tmp_path, tiny_vq_dir, "resumed") + ["--ckpt_path", str(last)])
    resumed = weights(tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt")
    assert resumed.keys() == straight.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"


def test_a_nan_loss_stops_naming_the_step_and_terms_and_keeps_the_good_checkpoint(tmp_path, tiny_vq_dir):
    poison = {"class_path": "test_checkpoint_safety.PoisonAtStep", "init_args": {"step": 2}}
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss=nan, text_loss=nan, image_loss="):
        main(config(tmp_path, tiny_vq_dir, "nan", callbacks=[poison]))
    last = tmp_path / "nan" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())


def test_a_huge_learning_rate_stops_instead_of_saving_garbage(tmp_path, tiny_vq_dir):
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at step"):
        main(config(tmp_path, tiny_vq_dir, "huge") + ["--model.optim.lr", "1e30", "--model.optim.projector_lr", "1e30"])
    last = tmp_path / "huge" / "version_0" / "checkpoints" / "last.ckpt"
    if last.is_file():  # a checkpoint from before the loss broke is fine; a non-finite one is not
        state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_skip_drops_non_finite_batches_and_the_run_finishes(tmp_path, tiny_vq_dir):
    poison = {"class_path": "test_checkpoint_safety.PoisonOnce", "init_args": {"step": 1}}
    with pytest.warns(UserWarning, match=r"non-finite training loss at step 2: .*skipping this batch"):
        main(config(tmp_path, tiny_vq_dir, "skip", callbacks=[poison]) + ["--nonfinite.action", "skip"])
    state = weights(tmp_path / "skip" / "version_0" / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


class PoisonOnce(L.Callback):
    """A NaN loss at one step only: the language model's input embeddings are poisoned for that
    step, the weights are not. (NaN pixels would not do: a generation-only batch turns its pixels
    into integer VQ codes, and its loss stays finite.)"""

    def __init__(self, step: int) -> None:
        self.step = step
        self._hook = None

    def poisoned(self, trainer) -> bool:
        return trainer.global_step == self.step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.poisoned(trainer):
            embeddings = pl_module.lm.get_input_embeddings()
            self._hook = embeddings.register_forward_hook(lambda module, args, output: output * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def test_non_finite_parameters_are_named():
    layer = torch.nn.Linear(2, 2)
    assert non_finite_parameters(layer) == []
    with torch.no_grad():
        layer.bias[1] = float("inf")
    assert non_finite_parameters(layer) == ["bias"]
