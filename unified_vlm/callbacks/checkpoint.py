"""Checkpoints that survive a crash: ``last.ckpt`` after every validation, written atomically,
never with non-finite weights, and at a SIGTERM (what SLURM and most schedulers send before a kill)."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM,)


class TrainingInterrupted(RuntimeError):
    """``fit`` was stopped by a signal; ``last.ckpt`` was saved first. The message says how to resume.

    ``exit_code`` is the shell's convention for a process ended by that signal (143 for SIGTERM)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


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

    During training a SIGTERM does not stop the run on the spot: at the end of the optimizer step
    (or validation) it arrived in, ``last.ckpt`` is saved, and ``fit`` raises
    ``TrainingInterrupted`` naming the file and the resume command (the CLI exits 143). Under DDP
    the ranks agree on the step (one all-reduce of a flag per step) and save together; a SIGTERM
    to rank 0 is forwarded to the ranks it launched. The previous SIGTERM handler (Lightning's) is
    put back when training ends.
    """

    # Set per fit in on_train_start (no __init__ override: the CLI reads ModelCheckpoint's signature).
    _signal: Optional[int] = None
    _previous_handlers: dict[int, object] = {}

    # ------------------------------------------------------------------ stop signals
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._signal, self._previous_handlers = None, {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._make_handler(trainer))

    def _make_handler(self, trainer):
        def handler(signum, frame) -> None:
            first = self._signal is None
            self._signal = signum
            if first:
                log.warning("received %s: saving last.ckpt at the end of this step, then stopping",
                            signal.Signals(signum).name)
                launcher = trainer.strategy.launcher
                if launcher is not None and hasattr(launcher, "kill"):
                    launcher.kill(signum)  # the DDP ranks this process started (none on the others)
        return handler

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _signalled(self, trainer, pl_module) -> bool:
        """Whether any rank received a stop signal; every rank calls this at the same point."""
        if not self._previous_handlers and self._signal is None:
            return False
        flag = self._signal is not None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            tensor = torch.tensor([1.0 if flag else 0.0], device=pl_module.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item() > 0)
        return flag

    def _stop_on_signal(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._signalled(trainer, pl_module):
            return
        signum = self._signal if self._signal is not None else int(signal.SIGTERM)  # another rank's
        candidates = self._monitor_candidates(trainer)
        if self.save_last:
            if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
                self._save_last_checkpoint(trainer, candidates)
            path = self.last_model_path
        else:
            path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
            if self._last_global_step_saved != trainer.global_step:
                self._save_checkpoint(trainer, path)
        self._restore_handlers()
        name = signal.Signals(signum).name
        if not path or not Path(path).is_file():
            raise TrainingInterrupted(
                f"fit stopped by {name} at step {trainer.global_step}; no checkpoint could be saved "
                "(see the warning above); nothing to resume from", signum)
        from unified_vlm.callbacks.evaluation_report import run_dir

        config = run_dir(trainer) / "config.yaml"
        config_arg = f"--config {config}" if config.is_file() else "--config <the run's config>"
        of = f" of {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        raise TrainingInterrupted(
            f"fit stopped by {name} at step {trainer.global_step}{of}: saved {path}. "
            f"Resume with: python -m unified_vlm fit {config_arg} --ckpt_path {path}", signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._stop_on_signal(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------ saving

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._stop_on_signal(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        """The weights training ended with are in ``last.ckpt`` too, also when the last step was not
        a validation step (``max_steps`` not a multiple of ``val_check_interval``)."""
        self._restore_handlers()
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
