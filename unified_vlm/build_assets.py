"""Rebuild the built-in weights shipped in ``unified_vlm/assets`` with the project's own code.

    python -m unified_vlm build-assets --encoder-minutes 10 --vq-minutes 10

writes ``watch_tokenizer/`` (text tokenizer, seconds), ``watch_encoder/`` (supervised
attribute-pretrained SigLIP, PAPER.md 2.2's frozen tower in miniature) and ``watch_vq/`` (the
64 px VQ tokenizer). Each part is written to a temporary directory and moved into place only
when complete, so an interrupted build never leaves a half-written asset.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from unified_vlm.assets import ASSETS_DIR

PARTS = ("tokenizer", "encoder", "vq")


def _replace_dir(built: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(built, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Rebuild the shipped tokenizer, encoder and VQ tokenizer."""
    p = argparse.ArgumentParser(prog="unified_vlm build-assets", description=main.__doc__)
    p.add_argument("--out", default=str(ASSETS_DIR), help="assets directory (default: the package's)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--encoder-minutes", type=float, default=10.0)
    p.add_argument("--vq-minutes", type=float, default=10.0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when building parts in parallel)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        start = time.time()
        work = Path(tempfile.mkdtemp(dir=out, prefix=f".build-{part}-"))
        try:
            built = work / "result"
            if part == "tokenizer":
                from unified_vlm.builders import watch_text_corpus
                from unified_vlm.text_tokenizer import train_text_tokenizer

                train_text_tokenizer(watch_text_corpus()).save_pretrained(built)
                target = out / "watch_tokenizer"
            elif part == "encoder":
                from unified_vlm.models.encoder_pretrain import main as pretrain_main

                code = pretrain_main(
                    ["--out", str(built), "--minutes", str(args.encoder_minutes), "--image-size", str(args.image_size),
                     "--log-dir", str(work / "logs")]
                )
                if code:
                    return code
                target = out / "watch_encoder"
            else:
                from unified_vlm.models.vq_module import main as vq_main

                code = vq_main(
                    ["--out", str(built), "--minutes", str(args.vq_minutes), "--image-size", str(args.image_size)]
                    + (["--threads", str(args.threads)] if args.threads else [])
                )
                if code:
                    return code
                target = out / "watch_vq"
            _replace_dir(built, target)
            print(f"built {target} in {time.time() - start:.0f} s")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0
