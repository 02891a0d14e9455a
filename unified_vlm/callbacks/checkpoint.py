"""Checkpoints that survive a crash: ``last.ckpt`` after every validation, written atomically,
and never with non-finite weights."""
from __future__ import annotations

import os

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding a NaN or an infinity."""
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    return [name for name, t in tensors if not bool(torch.isfinite(t).all())]


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` current and intact.

    Lightning saves ``last.ckpt`` at validation only when a top-k checkpoint was saved in the same
    step, so with ``save_top_k: 0`` a run that crashes keeps nothing; here every validation writes
    it (``every_n_train_steps`` adds saves between validations), and so does the end of training. Each file is written beside its
    target and renamed into place, so a crash mid-write leaves the previous one. A model whose
    weights are not finite is never saved: the last good checkpoint stays.
    """

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        """The weights training ended with are in ``last.ckpt`` too, also when the last step was not
        a validation step (``max_steps`` not a multiple of ``val_check_interval``)."""
        super().on_train_end(trainer, pl_module)
        if (self.save_last and not trainer.fast_dev_run and not trainer.sanity_checking
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        bad = non_finite_parameters(trainer.lightning_module)
        if bad:
            rank_zero_warn(
                f"not saving {filepath} at step {trainer.global_step}: {len(bad)} tensor(s) are not finite "
                f"(first: {bad[:3]}); the previous checkpoint is kept"
            )
            return
        partial = filepath + ".part"
        trainer.save_checkpoint(partial, self.save_weights_only)  # ends with a barrier: written on rank 0
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("RunCheckpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
