"""Staged training: start from another run's weights and freeze named parts (docs/paper.md 5.4, 6).

The paper argues that generation training helps understanding "inside the LLM" from a probe of
the adapters. The causal version trains understanding-only first, then continues on generation
data with the projectors frozen (or the LM frozen) and measures what understanding recovers.
That needs two things a plain run lacks: ``init_from`` (model weights of a finished run, without
its optimizer state or step) and ``freeze`` (named modules that get no gradient and stay put).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from unified_vlm.models import trainable_checkpoint

log = logging.getLogger(__name__)

FREEZABLE = ("und_projector", "gen_projector", "und_token_embedding", "gen_token_embedding", "und_feature_norm", "head", "lm", "lora")
"""Names ``model.freeze`` accepts. ``lm``: every weight of the language model (adapters too);
``lora``: only the LoRA adapter matrices (``backbone.train: lora``)."""
NOT_HERE = {
    "encoder": "the understanding encoder is frozen with encoder.freeze: true",
    "output_space": "the generation tokenizer / feature tower is always frozen",
    "und_distortion": "the distortion has no trainable parameter",
}
DISTORTION_PREFIX = "und_distortion."


def _lora_modules(lm: nn.Module) -> list[nn.Module]:
    return [m for name, m in lm.named_modules() if name.rsplit(".", 1)[-1].startswith("lora_")]


def check_freeze_names(model: nn.Module, names: Optional[Sequence[str]]) -> list[str]:
    """Validate ``model.freeze`` against this model's parts; return the names, deduplicated."""
    if names is None:
        return []
    if isinstance(names, str):
        raise ValueError(f"model.freeze must be a list of module names, not the string {names!r}; e.g. [{names}]")
    names = list(dict.fromkeys(names))
    for name in names:
        if name in NOT_HERE:
            raise ValueError(f"model.freeze: {name!r} cannot be named here: {NOT_HERE[name]}")
        if name not in FREEZABLE:
            raise ValueError(f"model.freeze: unknown module {name!r}; choose from {list(FREEZABLE)}")
        if name == "lora":
            if not _lora_modules(model.lm):
                raise ValueError("model.freeze names 'lora' but the backbone has no LoRA adapters (backbone.train is not lora)")
        elif getattr(model, name, None) is None:
            raise ValueError(f"model.freeze names {name!r} but this model has none (it is disabled in the config)")
    if getattr(model, "shares_projector", False) and ("und_projector" in names) != ("gen_projector" in names):
        raise ValueError(
            "model.freeze: und_projector and gen_projector are one shared module in this model "
            "(image_output.share_projector); name both or neither"
        )
    return names


def frozen_modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The modules behind ``names`` (validated by ``check_freeze_names``)."""
    out: list[nn.Module] = []
    for name in names:
        out.extend(_lora_modules(model.lm) if name == "lora" else [getattr(model, name)])
    return out


def freeze(model: nn.Module, names: Sequence[str]) -> None:
    """No gradient for any parameter of the named modules (``train()`` keeps them in eval mode)."""
    for module in frozen_modules(model, names):
        module.requires_grad_(False)


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, whole checkpoint) from a Lightning checkpoint or a bare state dict file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.init_from: no checkpoint file at {file}")
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.init_from: {file} is neither a Lightning checkpoint nor a state dict of tensors")
    return state, checkpoint


def load_model_weights(model: nn.Module, path: str) -> int:
    """Copy every model tensor from the checkpoint at ``path`` into ``model``; return how many.

    Only weights move: not the optimizer, scheduler or step. The understanding distortion is this
    run's configuration, so it is kept (logged when the source had another). Every other tensor
    must be present with the same shape; otherwise nothing is loaded and the error names them.
    """
    state, checkpoint = read_state_dict(path)
    if isinstance(checkpoint, dict) and checkpoint.get("state_dict") is state:
        trainable_checkpoint.restore(model, checkpoint, source=f"model.init_from {path}")
    own = model.state_dict()
    mine = {k for k in own if not k.startswith(DISTORTION_PREFIX)}
    theirs = {k for k in state if not k.startswith(DISTORTION_PREFIX)}
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
              for k in sorted(mine & theirs) if state[k].shape != own[k].shape]
    missing, extra = sorted(mine - theirs), sorted(theirs - mine)
    if shapes or missing or extra:
        def listing(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")

        problems = [f"shapes differ for {listing(shapes)}" if shapes else "",
                    f"missing in the checkpoint: {listing(missing)}" if missing else "",
                    f"not in this model: {listing(extra)}" if extra else ""]
        raise ValueError(
            f"model.init_from: {path} does not fit this model; " + "; ".join(p for p in problems if p)
            + ". The two runs need the same architecture (encoder, backbone size and training policy, projectors, head)"
        )
    saved_tokenizer = checkpoint.get("text_tokenizer_json") if isinstance(checkpoint, dict) else None
    if saved_tokenizer is not None and hasattr(model, "tokenizer"):
        from unified_vlm.text_tokenizer import tokenizer_to_json

        if saved_tokenizer != tokenizer_to_json(model.tokenizer):
            raise ValueError(
                f"model.init_from: {path} was trained with another text tokenizer than this run's "
                f"({model.hparams.get('text_tokenizer')!r}); its token ids would mean other words. Use the same text_tokenizer"
            )
    source = {k: state[k] for k in state if k.startswith(DISTORTION_PREFIX)}
    current = {k: v for k, v in own.items() if k.startswith(DISTORTION_PREFIX)}
    if source.keys() != current.keys() or any(not torch.equal(source[k], current[k]) for k in current):
        log.info("model.init_from: keeping this run's understanding distortion (%s); the source run had %s",
                 "none" if not current else "configured", "none" if not source else "another")
    with torch.no_grad():
        for key in mine:
            own[key].copy_(state[key])
    log.info("model.init_from: loaded %d tensors from %s (weights only: no optimizer state, step 0)", len(mine), path)
    return len(mine)


def load_init_weights(model) -> None:
    """At fit start: load ``model.init_from`` unless the fit resumes from its own checkpoint.

    Called from ``on_fit_start``: with most strategies the resumed checkpoint is restored by then
    (``trainer.ckpt_path`` is set, so the source is not read); with those that restore after setup
    (DeepSpeed, FSDP) the path is still unset and the restore overwrites these weights afterwards.
    """
    if model.init_from is not None and model.trainer.ckpt_path is None:
        load_model_weights(model, model.init_from)
