"""Learning-rate schedules: linear warmup, then a cosine to a floor (the unified model's, and the
part-training jobs' in ``pretraining.common``)."""
from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(step: int, warmup_steps: int, progress: float, floor: float = 0.0) -> float:
    """LR factor: linear warmup over ``warmup_steps``, then cosine from 1 to ``floor`` as
    ``progress`` (the share of the post-warmup budget used) goes from 0 to 1."""
    warmup = max(1, warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_over(total_steps: int, warmup_ratio: float, floor: float) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: warmup over ``warmup_ratio`` of ``total_steps`` (at least one step),
    then :func:`warmup_cosine` to ``floor`` at ``total_steps``. A plain function, so ``LambdaLR``
    keeps it out of checkpoints."""
    total = max(1, int(total_steps))
    warmup = max(1, int(warmup_ratio * total))

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup, (step - warmup) / max(1, total - warmup), floor)

    return factor
