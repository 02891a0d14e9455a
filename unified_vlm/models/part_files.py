"""One home for a part saved as a directory: ``config.json`` beside ``model.safetensors``.

The VQ tokenizer, the feature decoder and the watch reader are each saved so. Each part says what
its config is as JSON (and how to read it back); this module writes the two files, finds them with
an error that says what made them, and checks that saved weights fit the architecture before they
are loaded, naming the keys and shapes that differ.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_part", "read_part_config", "load_part_weights", "state_dict_mismatch"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_part(directory: str | os.PathLike, config: Mapping[str, Any], module: nn.Module) -> None:
    """Write ``config`` as ``config.json`` and ``module``'s weights as ``model.safetensors`` into
    ``directory`` (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def read_part_config(directory: str | os.PathLike, part: str, written_by: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved ``part``; FileNotFoundError naming the missing file
    and ``written_by`` (the command or method that writes such a directory) when either file is absent."""
    holds = f"a {part} directory holds {CONFIG_NAME} and {WEIGHTS_NAME}, as written by {written_by}"
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{part} directory {str(directory)!r} does not exist: {holds}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{part} file {path} not found: {holds}")
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        return json.load(f)


def load_part_weights(module: nn.Module, directory: str | os.PathLike, part: str,
                      map_location: str = "cpu", as_float: bool = False) -> nn.Module:
    """Load ``model.safetensors`` of ``directory`` into ``module`` after checking that its keys and
    shapes are the module's (``as_float``: floating tensors cast to float32 first)."""
    state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(map_location))
    problems = state_dict_mismatch(module.state_dict(), state)
    if problems:
        raise ValueError(
            f"{part} weights in {directory} do not match the architecture in its {CONFIG_NAME} "
            f"(wrong files or an edited config): {'; '.join(problems)}"
        )
    if as_float:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state)
    return module


def state_dict_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> list[str]:
    """How ``found`` differs from ``expected``: missing and unexpected keys, shape mismatches
    (each list cut at 8 entries); empty when they match."""
    def cut(items: list[str]) -> str:
        return f"{items[:8]}{' ...' if len(items) > 8 else ''} ({len(items)} in all)"

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if found[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {cut(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {cut(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {cut(shapes)}")
    return problems
