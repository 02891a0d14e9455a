"""Checkpoints that hold only what training changes (``model.checkpoint_weights: trainable``).

A LoRA run of a 7B backbone trains adapters, projectors and a head (millions of weights) beside
billions of frozen ones that the model rebuilds from its local paths anyway (the encoder, the LM
base, the VQ tokenizer): saving them in every checkpoint costs gigabytes a file. In ``trainable``
mode a checkpoint keeps every trainable parameter and every buffer, drops the frozen parameters,
and records a fingerprint of them per top-level module. Loading (``fit --ckpt_path``, ``test``,
``model.init_from``, ``load_from_checkpoint``) puts the model's own frozen weights back after
checking that fingerprint, so a base whose weights are not the ones trained on (another path,
another version, a from-config tower built with another seed) is refused naming the module,
never silently mixed with the adapters. Optimizer state holds trainable parameters only, so it is
kept whole.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

KEY = "trainable_only"
MODES = ("all", "trainable")
RELATIVE_TOLERANCE = 1e-4  # the same weights summed on another device or in another order


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"model.checkpoint_weights must be one of {list(MODES)}, got {mode!r}")
    return mode


def frozen_parameter_names(module: nn.Module) -> list[str]:
    """State-dict names of the parameters that get no gradient."""
    return [name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]


def fingerprint(module: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per top-level module: how many tensors and elements, and their sum and sum of squares (float64)."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name in names:
            group = out.setdefault(name.split(".", 1)[0], {"tensors": 0, "elements": 0, "sum": 0.0, "sum_sq": 0.0})
            t = tensors[name].detach().double()
            group["tensors"] += 1
            group["elements"] += t.numel()
            group["sum"] += float(t.sum())
            group["sum_sq"] += float((t * t).sum())
    return out


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= RELATIVE_TOLERANCE * max(scale, 1e-12)


def prune(module: nn.Module, checkpoint: dict) -> int:
    """Drop the frozen parameters from ``checkpoint["state_dict"]`` and record their fingerprint."""
    state = checkpoint["state_dict"]
    names = [n for n in frozen_parameter_names(module) if n in state]
    for name in names:
        del state[name]
    checkpoint[KEY] = {"dropped": len(names), "fingerprint": fingerprint(module, names)}
    return len(names)


def restore(module: nn.Module, checkpoint: dict, source: str = "the checkpoint") -> int:
    """Fill a trainable-only checkpoint's state dict with ``module``'s frozen weights; return how many.

    Raises ``ValueError`` naming the module when a missing tensor is trainable here (the runs froze
    different parts) or when the module's frozen weights are not the ones the checkpoint was
    trained on. A full checkpoint is left as it is (returns 0).
    """
    info = checkpoint.get(KEY) if isinstance(checkpoint, dict) else None
    if not info:
        return 0
    state = checkpoint["state_dict"]
    frozen = set(frozen_parameter_names(module))
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    trainable_here = [k for k in missing if k not in frozen]
    if trainable_here:
        raise ValueError(
            f"{source} holds only the trainable weights (model.checkpoint_weights: trainable), and {len(trainable_here)} "
            f"tensor(s) this model trains are not in it (first: {trainable_here[:3]}): the run that saved it froze them. "
            "Load it with the same training policy (backbone.train, encoder.freeze, model.freeze)")
    saved = info.get("fingerprint", {})
    mine = fingerprint(module, [k for k in missing if k in frozen])
    for group in sorted(set(saved) | set(mine)):
        a, b = saved.get(group), mine.get(group)
        same = (a is not None and b is not None and a["tensors"] == b["tensors"] and a["elements"] == b["elements"]
                and _close(a["sum_sq"], b["sum_sq"], a["sum_sq"])
                and _close(a["sum"], b["sum"], max(abs(a["sum"]), (a["sum_sq"] * max(a["elements"], 1)) ** 0.5)))
        if not same:
            raise ValueError(
                f"{source} holds only the trainable weights (model.checkpoint_weights: trainable); the frozen weights of "
                f"{group!r} it was trained on are not this model's ({_describe(a)} saved, {_describe(b)} here). Build the "
                "model from the same base files it was trained with (model.encoder.weights, the backbone's path, "
                "model.image_output.tokenizer), or use a checkpoint saved with model.checkpoint_weights: all")
    state.update({k: own[k] for k in missing})
    return len(missing)


def _describe(group: dict | None) -> str:
    if group is None:
        return "none"
    return f"{group['tensors']} tensors, {group['elements']:,} elements, sum {group['sum']:.6g}"
