"""Stop (or skip the batch) on a NaN or infinite training loss, instead of training on garbage."""
from __future__ import annotations

import torch
import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

ACTIONS = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the loss terms."""


class NonFiniteLossGuard(L.Callback):
    """Checks the loss before every backward pass.

    ``stop`` (default) raises ``NonFiniteLossError`` naming the step and every loss term, before
    the bad gradients touch the weights (so the last checkpoint stays good). ``skip`` drops that
    batch's gradients, so the optimiser leaves every weight unchanged for the step (the learning
    rate schedule still advances), and warns. Under DDP the verdict is agreed by all ranks.
    """

    def __init__(self, action: str = "stop") -> None:
        if action not in ACTIONS:
            raise ValueError(f"nonfinite.action must be one of {ACTIONS}, got {action!r}")
        self.action = action
        self.skipped = 0
        self._skip_next = False

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            flag = bad.float().reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag[0] > 0
        if not bool(bad):
            return
        terms = getattr(pl_module, "last_loss_terms", None) or {"loss": loss}
        described = ", ".join(f"{k}={float(v):.6g}" for k, v in terms.items())
        message = f"non-finite training loss at step {trainer.global_step + 1}: {described}"
        if self.action == "stop":
            raise NonFiniteLossError(
                message + ". Training stopped before this step changed the weights; lower model.optim.lr "
                "(or set --nonfinite.action skip to drop such batches)"
            )
        self.skipped += 1
        self._skip_next = True
        rank_zero_warn(message + f"; skipping this batch ({self.skipped} skipped so far)")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._skip_next:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._skip_next = False
