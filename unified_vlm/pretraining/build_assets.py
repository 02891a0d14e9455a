"""Build the built-in weights with the project's own code: into the package, or into the cache.

    python -m unified_vlm build-assets --encoder-minutes 10 --vq-minutes 10

writes ``watch_tokenizer/`` (text tokenizer, seconds), ``watch_encoder/`` (supervised
attribute-pretrained SigLIP, docs/paper.md 2.2's frozen tower in miniature) and ``watch_vq/`` (the
64 px VQ tokenizer) into ``unified_vlm/assets``. :func:`ensure_builtin` builds one missing part the
same way into ``$UNIFIED_VLM_CACHE``: this is the one place that trains a missing built-in weight,
and the commands that build a model from a config call :func:`prepare_builtin_assets` before the
model exists. Each part is written to a temporary directory and moved into place only when
complete, so an interrupted build never leaves a half-written asset.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence

from unified_vlm.assets import ASSETS_DIR, BUILTIN, BUILTIN_ASSETS, cached, find_builtin, require_builtin
from unified_vlm.files import publish_dir
from unified_vlm.pretraining.common import own_hyperparameters, torch_threads

log = logging.getLogger(__name__)

PARTS = tuple(BUILTIN_ASSETS)  # tokenizer, encoder, vq


def build_part(part: str, directory: str | Path, minutes: Optional[float] = None, image_size: int = 64,
               threads: Optional[int] = None, replace_existing: bool = True) -> None:
    """Train built-in ``part`` and publish it atomically at ``directory``. Without
    ``replace_existing`` an existing ``directory`` (another process finished first) is kept."""
    minutes = BUILTIN_ASSETS[part].minutes if minutes is None else minutes

    def write(tmp: str) -> None:
        with torch_threads(threads), own_hyperparameters():
            if part == "tokenizer":
                from unified_vlm.pretraining.train_text_tokenizer import train_watch_tokenizer

                train_watch_tokenizer().save_pretrained(tmp)
            elif part == "encoder":
                from unified_vlm.pretraining.pretrain_encoder import format_table, pretrain

                with tempfile.TemporaryDirectory() as logs:
                    metrics = pretrain(tmp, minutes=minutes, image_size=image_size, log_dir=logs)
                log.warning("watch encoder pretrained:\n%s", format_table(metrics))
            elif part == "vq":
                from unified_vlm.pretraining.train_vq import train_vq_tokenizer

                tokenizer, metrics = train_vq_tokenizer(None, max_minutes=minutes, image_size=image_size)
                tokenizer.save_pretrained(tmp)
                log.warning("VQ tokenizer trained: val PSNR %.2f dB, codebook usage %.1f%%",
                            metrics.get("val/psnr", float("nan")), 100 * metrics.get("val/codebook_usage", float("nan")))
            else:
                raise ValueError(f"unknown part {part!r}; choose from {PARTS}")

    try:
        publish_dir(write, str(directory), f"build-{part}", replace_existing=replace_existing)
    except OSError:
        if replace_existing or find_builtin(part) is None:
            raise


def ensure_builtin(kind: str, minutes: Optional[float] = None) -> Path:
    """The built-in ``kind`` weights (shipped or cached), training and caching them first when missing."""
    if find_builtin(kind) is None:
        target = cached(BUILTIN_ASSETS[kind].cache_name)
        budget = BUILTIN_ASSETS[kind].minutes if minutes is None else minutes
        log.warning("no built-in %s at %s: training one now (about %g minutes) and caching it", kind, target, budget)
        build_part(kind, target, minutes=budget, replace_existing=False)
    return require_builtin(kind)


def _encoder_kind(spec: Any) -> Optional[str]:
    """The built-in asset an encoder spec (a dict) needs, if any."""
    if not isinstance(spec, Mapping) or spec.get("weights", BUILTIN) != BUILTIN:
        return None
    return {"siglip": "encoder", "vq_codes": "vq"}.get(spec.get("name", "siglip"))


def builtin_kinds(model_config: Mapping[str, Any]) -> list[str]:
    """The built-in assets a ``UnifiedVLM`` config (its init arguments as plain dicts) needs."""
    kinds = []
    if model_config.get("text_tokenizer", BUILTIN) == BUILTIN:
        kinds.append("tokenizer")
    encoder = model_config.get("encoder") or {}
    kinds.append(_encoder_kind(encoder))
    output = model_config.get("image_output") or {}
    if output.get("space", "vq") == "vq":
        kinds.append("vq" if output.get("tokenizer", BUILTIN) == BUILTIN else None)
    else:
        kinds.append(_encoder_kind(output.get("encoder") or encoder))
    return list(dict.fromkeys(k for k in kinds if k))


def prepare_builtin_assets(model_config: Mapping[str, Any]) -> None:
    """Train (once) and cache every built-in asset ``model_config`` needs that is missing."""
    for kind in builtin_kinds(model_config):
        ensure_builtin(kind)


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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    minutes = {"encoder": args.encoder_minutes, "vq": args.vq_minutes}
    for part in parts:
        start = time.time()
        target = Path(args.out) / BUILTIN_ASSETS[part].shipped_name
        build_part(part, target, minutes=minutes.get(part), image_size=args.image_size, threads=args.threads)
        print(f"built {target} in {time.time() - start:.0f} s")
    return 0
