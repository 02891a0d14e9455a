"""Stop (or skip the batch) on a NaN or infinite training loss, instead of training on garbage."""
from __future__ import annotations

import lightning as L
import torch
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

    ``skip`` is capped: once more than ``skip_allowance`` batches were skipped, a skip that makes
    the skipped share of the batches seen exceed ``max_skip_fraction`` stops the run like ``stop``
    (a run that skips most of its batches has not trained). The end of training reports how many
    batches were skipped. The counts are kept in the checkpoint, so a resumed run continues them.
    """

    def __init__(self, action: str = "stop", max_skip_fraction: float = 0.1, skip_allowance: int = 3) -> None:
        if action not in ACTIONS:
            raise ValueError(f"nonfinite.action must be one of {ACTIONS}, got {action!r}")
        if not 0.0 <= max_skip_fraction <= 1.0 or skip_allowance < 0:
            raise ValueError(f"nonfinite.max_skip_fraction must be in [0, 1] and nonfinite.skip_allowance >= 0, "
                             f"got {max_skip_fraction}, {skip_allowance}")
        self.action = action
        self.max_skip_fraction, self.skip_allowance = max_skip_fraction, skip_allowance
        self.skipped = 0
        self.seen = 0
        self._skip_next = False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "seen": self.seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.seen = int(state_dict.get("skipped", 0)), int(state_dict.get("seen", 0))

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self.seen += 1
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
        if self.skipped > self.skip_allowance and self.skipped > self.max_skip_fraction * self.seen:
            raise NonFiniteLossError(
                message + f". {self.skipped} of {self.seen} training batches had a non-finite loss, more than "
                f"nonfinite.max_skip_fraction={self.max_skip_fraction} of them (after nonfinite.skip_allowance="
                f"{self.skip_allowance} skips): training stopped, the run would not have trained. Lower model.optim.lr "
                "or check the data (or raise --nonfinite.max_skip_fraction)"
            )
        self._skip_next = True
        rank_zero_warn(message + f"; skipping this batch ({self.skipped} of {self.seen} skipped so far)")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.skipped:
            rank_zero_warn(f"{self.skipped} of {self.seen} training batches had a non-finite loss and were skipped "
                           "(nonfinite.action skip)")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._skip_next:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._skip_next = False
