"""The per-module parameter table a fit logs at its start: trainable and frozen counts, with the
training policy of each top-level part of a UnifiedVLM."""
from __future__ import annotations

from typing import Any

from torch import nn


def rows(model) -> list[dict[str, Any]]:
    """Trainable and frozen parameter counts per top-level module of ``model``, with its policy
    (a module shared by two roles is counted once, under its first name)."""
    policies = {
        "encoder": "frozen" if model.encoder_frozen else "full",
        "lm": model.backbone_policy,
        "output_space": "frozen",
    }
    out, seen = [], set()
    for name, module in model.named_children():
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        if trainable + frozen == 0:
            continue
        shared = "+gen" if name == "und_projector" and model.shares_projector else ""  # one module, two roles
        policy = policies.get(name, "full")
        if name in model.frozen or (name == "lm" and "lora" in model.frozen):
            policy = "frozen" if name != "lm" or "lm" in model.frozen else "lora, frozen"
        out.append({"module": name + shared, "policy": policy,
                    "trainable": trainable, "frozen": frozen})
    return out


def format_rows(table: list[dict[str, Any]]) -> str:
    """The table as aligned text, with a total line."""
    lines = [f"{'module':<22}{'policy':<14}{'trainable':>14}{'frozen':>15}"]
    for r in table:
        lines.append(f"{r['module']:<22}{r['policy']:<14}{r['trainable']:>14,}{r['frozen']:>15,}")
    lines.append(f"{'total':<36}{sum(r['trainable'] for r in table):>14,}{sum(r['frozen'] for r in table):>15,}")
    return "\n".join(lines)


def frozen_towers(model: nn.Module) -> list[nn.Module]:
    """The model's vision towers that train nothing (``encoder``, ``output_space``): what FSDP keeps
    replicated and what the memory estimate does not shard."""
    out = []
    for name in ("encoder", "output_space"):
        module = getattr(model, name, None)
        params = list(module.parameters()) if module is not None else []
        if params and not any(p.requires_grad for p in params):
            out.append(module)
    return out
