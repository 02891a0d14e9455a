"""The unified model's two losses (docs/paper.md 3.1): next-token text cross-entropy and the image
loss of the output head at the generation slots; and the zero-weight terms that keep the parts a
batch did not use in the graph."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unified_vlm.tokens import IGNORE_INDEX

TEXT_LOSS_AVERAGES = ("token", "turn")


def text_loss(logits: torch.Tensor, targets: torch.Tensor, average: str, end_turn_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of (B, T, V) ``logits`` against (B, T) ``targets``, averaged as
    ``average`` says, and the number of things averaged (supervised tokens or turns), which
    ``global_batch_means`` needs.

    ``token``: the mean over every supervised token of the batch (HF style, the paper's).
    ``turn``: every supervised assistant turn (the tokens up to and including its END_TURN,
    ``end_turn_id``) weighs the same, whatever its length. A one-word VQA answer then counts as
    much as an 8-token time or a 40-token caption, instead of being drowned by them.
    """
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    valid = targets != IGNORE_INDEX
    if average == "token":
        count = valid.sum()
        return ce.sum() / count.clamp(min=1), count
    ends = (targets == end_turn_id) & valid
    turn = torch.cumsum(ends.long(), dim=1) - ends.long()  # END_TURN belongs to the turn it closes
    group = (turn + torch.arange(targets.shape[0], device=targets.device)[:, None] * targets.shape[1])[valid]
    sizes = torch.zeros(targets.numel(), device=targets.device).scatter_add_(0, group, torch.ones_like(group, dtype=torch.float))
    count = (sizes > 0).sum()
    return (ce[valid] / sizes[group]).sum() / count.clamp(min=1), count


def image_loss(head: nn.Module, hidden: torch.Tensor, slot_mask: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's loss at the generation slots: the hidden state *before* each slot predicts that
    slot's image token. ``hidden`` (B, L, H); ``slot_mask`` (B, L - 1), True where token t + 1 is
    a GEN_PAD slot; ``targets`` (N, T[, D]), one row per generated image, in slot order. Returns
    the mean over the slots and their number."""
    prediction = head(hidden[:, :-1][slot_mask])
    return head.loss(prediction, targets.reshape(prediction.shape[0], *targets.shape[2:])), slot_mask.sum()


def global_batch_means(means: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], distributed: bool,
                       step_counts: Optional[torch.Tensor] = None, accumulate: int = 1) -> list[torch.Tensor]:
    """This rank's ``means`` (each over its ``counts`` elements) rescaled so that the gradient the
    optimiser steps with is that of the mean over the whole optimiser step's batch.

    Why: DDP averages the ranks' gradients and Lightning divides each of ``accumulate``
    micro-batch losses by ``accumulate``, so per-micro-batch means weigh an element of a rank
    (or micro-batch) holding few supervised tokens / turns / image slots more than one of a
    crowded one: not what one process on the same global batch computes. Multiplying each mean by
    ``count x world x accumulate / step count`` (the step count over every rank and micro-batch)
    makes it ``sum x world x accumulate / step count``, which the averaging turns back into
    ``global sum / step count``.

    The step count comes from ``step_counts`` (one per mean, counted by the data ahead of the step,
    ``TaskMixSampler``'s ``counter``), else, when ``distributed`` (training under an initialised
    process group), from an all-reduce of ``counts`` (no gradient flows through it): exact for
    DDP, per micro-batch under accumulation. One process without step counts: ``means`` as they are
    (bit-identical to averaging per batch).
    """
    world = dist.get_world_size() if distributed and dist.is_available() and dist.is_initialized() else 1
    if step_counts is None:
        if world == 1:
            return list(means)
        step_counts = torch.stack([c.detach().float() for c in counts])
        dist.all_reduce(step_counts)
        accumulate = 1  # the all-reduced count covers this micro-batch only
    scale = torch.stack([c.detach().float() for c in counts]) * (world * accumulate) / step_counts.float().clamp(min=1)
    return [m * s.to(m.dtype) for m, s in zip(means, scale.to(means[0].device))]


def idle_parameters(idle: Iterable[nn.Module | None], used: Iterable[nn.Module | None]) -> list[nn.Parameter]:
    """The trainable parameters of the ``idle`` modules (parts a batch did not run) that no
    ``used`` module shares (a shared projector runs on one side while the other idles)."""
    taken = {id(p) for m in used if m is not None for p in m.parameters()}
    out, seen = [], set()
    for module in idle:
        for p in module.parameters() if module is not None else ():
            if p.requires_grad and id(p) not in taken and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def zero_weight(parameters: Iterable[nn.Parameter]) -> torch.Tensor | float:
    """0 x the sum of ``parameters``: added to a loss, it changes no value but puts each of them in
    the graph with a zero gradient, as DDP needs of every trainable parameter at every step."""
    return sum(p.sum() for p in parameters) * 0.0
