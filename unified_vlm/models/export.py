"""``python -m unified_vlm export RUN_DIR OUT_DIR``: a trained model as files other tools can read.

A checkpoint is a Lightning archive of one run: the LoRA adapters sit beside their base, the
language model is wrapped in peft, and only this project can rebuild it. The export directory is:

- ``backbone/``: the language model as a standard Hugging Face directory (``save_pretrained``),
  LoRA merged into its weights, loadable with ``AutoModelForCausalLM.from_pretrained``;
- ``tokenizer/``: the text tokenizer (``save_pretrained``), chat special tokens included;
- ``parts.safetensors``: every other tensor of the model (encoder, projectors, per-token
  vectors, head, output space);
- ``unified_vlm.json``: the model's configuration, with the backbone as ``pretrained`` from
  ``backbone/`` and the text tokenizer from ``tokenizer/`` (paths relative to the directory).

``load_exported(OUT_DIR)`` builds the same model again (same outputs; the round trip is tested).
The encoder and VQ tokenizer are built from their configured specs (``builtin`` or a local path)
and then take the exported weights, so those specs must resolve where the export is loaded.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

FORMAT = 1
CONFIG_FILE = "unified_vlm.json"
PARTS_FILE = "parts.safetensors"
BACKBONE_DIR, TOKENIZER_DIR = "backbone", "tokenizer"


class ExportError(ValueError):
    """An export that cannot be made or read; the message says what to change."""


def find_checkpoint(run: str | os.PathLike) -> Path:
    """The checkpoint behind ``run``: a ``.ckpt`` file, a run version directory (its
    ``checkpoints/last.ckpt``, else its newest checkpoint) or a directory of versions (the newest
    version that has one)."""
    path = Path(run)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ExportError(f"{path}: no such run directory or checkpoint file")
    candidates = [path] + sorted((p for p in path.glob("version_*") if p.is_dir()),
                                 key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1,
                                 reverse=True)
    for directory in candidates:
        last = directory / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
        found = sorted((directory / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise ExportError(f"{path}: no checkpoint in it (looked for checkpoints/*.ckpt in it and its version_* directories); "
                      "export needs a run that `fit` has saved, or give the .ckpt file")


def exported_config(hparams: dict) -> dict:
    """The model configuration of the export: the backbone read from ``backbone/`` in full, the text
    tokenizer from ``tokenizer/``, nothing left to load or freeze at fit start."""
    config = copy.deepcopy({k: v for k, v in hparams.items() if not k.startswith("_")})
    config["backbone"] = {"name": "pretrained", "options": {"path": BACKBONE_DIR}, "train": "full", "lora": {},
                          "gradient_checkpointing": False}
    config["text_tokenizer"] = TOKENIZER_DIR
    config.update({"init_from": None, "freeze": None, "checkpoint_weights": "all"})
    return config


def merged_backbone(model) -> torch.nn.Module:
    """The model's language model with any LoRA adapters merged into its weights (a copy)."""
    lm = copy.deepcopy(model.lm)
    if hasattr(lm, "merge_and_unload"):  # a peft model
        lm = lm.merge_and_unload()
    for p in lm.parameters():
        p.requires_grad_(True)
    return lm


def export_model(model, out_dir: str | os.PathLike, overwrite: bool = False, source: str = "") -> Path:
    """Write ``model`` (a ``UnifiedVLM``) to ``out_dir`` as described in the module doc; atomically
    (a temp directory beside it, renamed into place). An existing non-empty ``out_dir`` is kept
    unless ``overwrite``."""
    from safetensors.torch import save_file

    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export_", dir=out.parent))
    try:
        merged_backbone(model).save_pretrained(tmp / BACKBONE_DIR)
        model.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        parts = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith("lm.")}
        save_file(parts, str(tmp / PARTS_FILE), metadata={"format": str(FORMAT)})
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "source": source,
                                                   "model": exported_config(dict(model.hparams))}, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old_", dir=out.parent))
            os.replace(out, old / "previous")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_exported(directory: str | os.PathLike):
    """The ``UnifiedVLM`` written by ``export_model`` (eval mode, on the CPU)."""
    from safetensors.torch import load_file

    from unified_vlm.models.unified import UnifiedVLM

    root = Path(directory)
    config_file = root / CONFIG_FILE
    if not config_file.is_file():
        raise ExportError(f"{root}: not an export directory (no {CONFIG_FILE}); write one with `python -m unified_vlm export`")
    payload = json.loads(config_file.read_text())
    if payload.get("format") != FORMAT:
        raise ExportError(f"{config_file}: export format {payload.get('format')!r}, this version reads {FORMAT}")
    config = copy.deepcopy(payload["model"])
    config["backbone"]["options"]["path"] = str(root / config["backbone"]["options"]["path"])
    config["text_tokenizer"] = str(root / config["text_tokenizer"])
    model = UnifiedVLM(**config)
    parts = load_file(str(root / PARTS_FILE))
    own = {k for k in model.state_dict() if not k.startswith("lm.")}
    if set(parts) != own:
        raise ExportError(f"{root / PARTS_FILE} does not fit the model of {CONFIG_FILE}: "
                          f"missing {sorted(own - set(parts))[:5]}, unexpected {sorted(set(parts) - own)[:5]}")
    missing, unexpected = model.load_state_dict(parts, strict=False)
    assert not unexpected and all(k.startswith("lm.") for k in missing)
    return model.eval()


def export_run(run: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Export the checkpoint behind ``run`` (see ``find_checkpoint``)."""
    from unified_vlm.files import load_checkpoint
    from unified_vlm.models.unified import UnifiedVLM

    ckpt = find_checkpoint(run)
    load_checkpoint(ckpt)  # refuses a file that would run code, or a truncated one, naming it
    model = UnifiedVLM.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return export_model(model.eval(), out_dir, overwrite=overwrite, source=str(ckpt))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unified_vlm export",
        description="Write a run's model as a Hugging Face backbone directory (LoRA merged) plus the projector, head, "
                    "tokenizer and config files; load it again with unified_vlm.models.export.load_exported.")
    parser.add_argument("run", help="a run directory (runs/NAME or runs/NAME/version_N) or a .ckpt file")
    parser.add_argument("out", help="the directory to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    args = parser.parse_args(argv)
    from unified_vlm.files import CheckpointError

    try:
        out = export_run(args.run, args.out, overwrite=args.overwrite)
    except (ExportError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (backbone/: Hugging Face causal LM; load the whole model with "
          f"unified_vlm.models.export.load_exported({str(out)!r}))")
    return 0
