"""Scaffolding every part-training job shares, written once: a time or step budget, the
warmup-cosine schedule, the torch thread count, and publishing the trained part atomically.

The jobs train small parts on a shared 2-core CPU for a few minutes, so two facts shape this:
a run is usually budgeted in *minutes*, and the learning rate should reach its floor when the
time runs out; and the fastest thread count changes as other jobs start and stop, so it is
measured, not assumed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer

from unified_vlm.files import publish_dir
from unified_vlm.models.schedules import warmup_cosine

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- schedule
def cosine_with_warmup(step: int, warmup_steps: int, max_steps: int, floor: float = 0.05) -> float:
    """:func:`warmup_cosine` over a known step count."""
    return warmup_cosine(step, warmup_steps, (step - warmup_steps) / max(1, max_steps - warmup_steps), floor)


class BudgetCosine:
    """A ``LambdaLR`` factor: warmup, then cosine to zero over the Trainer's step budget, or over its
    ``max_time`` when it has no step budget (a job trained for N minutes)."""

    def __init__(self, module: L.LightningModule, warmup_steps: int) -> None:
        self.module, self.warmup = module, max(1, warmup_steps)
        self.total: Optional[float] = None

    def progress(self, step: int) -> float:
        trainer = self.module._trainer
        if trainer is None:
            return 0.0
        if self.total is None:
            self.total = float(trainer.estimated_stepping_batches)
        if math.isfinite(self.total):
            return (step - self.warmup) / max(1, self.total - self.warmup)
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        if timer is not None and timer._duration:
            return timer.time_elapsed("train") / timer._duration
        return 0.0  # no budget known: constant LR after warmup

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup, self.progress(step))


def adamw_without_norm_decay(params, lr: float, weight_decay: float, betas=(0.9, 0.99)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (never on norms and biases)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ------------------------------------------------------------------------------- budget
def budget_trainer(minutes: float, max_steps: int = -1, precision: str = "bf16-mixed", accelerator: str = "auto",
                   progress_bar: bool = True) -> L.Trainer:
    """A single-device Trainer that stops after ``minutes`` (or ``max_steps``), validates four
    times, clips gradients and writes nothing (the job saves the part itself)."""
    return L.Trainer(
        accelerator=accelerator, devices=1, precision=precision,
        max_time=timedelta(minutes=minutes), max_steps=max_steps, val_check_interval=0.25,
        gradient_clip_val=1.0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=progress_bar,
    )


def steps_for_minutes(minutes: float, seconds_per_step: float) -> int:
    """How many steps fit ``minutes``: 1.1 for Lightning and the optimizer, 0.85 for validation."""
    return max(10, int(minutes * 60 * 0.85 / (seconds_per_step * 1.1)))


@contextlib.contextmanager
def own_hyperparameters() -> Iterator[None]:
    """Run a part-training job with its own hyper-parameters, also when called while LightningCLI
    instantiates classes: that context hands the CLI's hyper-parameters to every
    ``save_hyperparameters()`` call (``AttributeDict has no attribute 'num_train'``)."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (None: leave as is); the count is restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seconds_per_step(step: Callable[[Any], torch.Tensor], loader, steps: int = 3, budget_s: float = 6.0) -> float:
    """Median wall time of ``step(batch).backward()`` under bf16 autocast on this machine, now."""
    batches = iter(loader)
    times: list[float] = []
    while len(times) <= steps and sum(times) < budget_s:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step(next(batches))
        loss.backward()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:] or times))


def fastest_thread_count(step: Callable[[Any], torch.Tensor], loader) -> tuple[int, float]:
    """Time steps with torch's thread count and with one thread, set and return the faster (and its s/step).

    On the shared 2-core development machine, 2 threads beside another busy process ran a step
    20x slower than 1 thread (OpenMP threads spin-waiting for a core), while alone 2 threads
    are about 1.7x faster: so measure instead of guessing.
    """
    timings = {}
    for n in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(n)
        timings[n] = seconds_per_step(step, loader)
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    log.info("seconds per step by thread count: %s", timings)
    return best, timings[best]


class ThreadTuner(L.Callback):
    """Every ``every`` steps, time one step with the other thread count (all or 1) and switch when it
    is clearly faster: on a shared machine the best count changes as other jobs start and stop."""

    def __init__(self, every: int = 100, threads: int = 2) -> None:
        self.every, self.options = every, sorted({threads, 1})
        self.recent: list[float] = []
        self.current = torch.get_num_threads()
        self.trial = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.trial = len(self.options) > 1 and trainer.global_step % self.every == self.every - 1
        if self.trial:
            torch.set_num_threads(next(n for n in self.options if n != self.current))
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self.start
        if not self.trial:
            self.recent = (self.recent + [elapsed])[-20:]
            return
        if elapsed < 0.8 * float(np.median(self.recent or [elapsed])):
            self.current, self.recent = torch.get_num_threads(), []
            log.info("switching to %d thread(s): %.3f s/step", self.current, elapsed)
        torch.set_num_threads(self.current)


# ------------------------------------------------------------------------------- saving
def check_out_dir(directory: str | os.PathLike, overwrite: bool, owned_files: Optional[set[str]] = None) -> Path:
    """``directory`` as a Path, checked before training so a run cannot fail at the end: it may
    exist only with ``overwrite``, only as a directory, and (with ``owned_files``) holding nothing
    but those files, so a replace never deletes anything that is not a saved part."""
    out = Path(directory)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output path {out} exists and is not a directory; pick another --out")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"output directory {out} exists and is not empty; pass --overwrite "
                                  "(overwrite=True) to replace it, or choose another --out")
        stray = sorted(set(os.listdir(out)) - owned_files) if owned_files is not None else []
        if stray:
            raise FileExistsError(f"{out} exists and holds other files ({stray[:5]}); pick another --out")
    return out


def save_dir_atomically(save: Callable[[str], object], directory: str | os.PathLike, prefix: str,
                        overwrite: bool = True, owned_files: Optional[set[str]] = None) -> None:
    """``save(tmp)`` into a temp dir, then publish it at ``directory`` (see :func:`check_out_dir`).
    Without ``overwrite``, a directory another process published meanwhile wins over ours."""
    check_out_dir(directory, overwrite, owned_files)
    try:
        publish_dir(save, str(directory), prefix, replace_existing=overwrite)
    except OSError:
        if overwrite or not any(Path(directory).iterdir()):
            raise
