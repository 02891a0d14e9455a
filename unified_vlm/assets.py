"""Where built-in weights are found, and the one place that trains a missing one.

The tiny default needs a text tokenizer, a pretrained watch encoder and a VQ tokenizer. Small
versions ship in ``unified_vlm/assets/``; when one is absent (a trimmed install) it is trained
once by the project's own jobs (``unified_vlm.pretraining``) and cached under
``$UNIFIED_VLM_CACHE`` (default ``~/.cache/unified_vlm``), so nothing is ever downloaded.

This module only *finds* built-in weights (:func:`require_builtin`); it imports nothing else of
the package, so every part can use it. Training a missing one happens before a model is built,
never inside its constructor: every command that builds a model from a config (fit / validate /
test / predict) calls ``unified_vlm.pretraining.build_assets.prepare_builtin_assets`` first, and
a notebook user calls ``ensure_builtin`` from there (the error of :func:`require_builtin` says so).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN = "builtin"


@dataclass(frozen=True)
class BuiltinAsset:
    """One kind of built-in weights: its shipped folder, its cache folder, the file that says it is complete."""

    shipped_name: str
    cache_name: str
    marker: str
    minutes: float  # the default training budget when it has to be trained


# Keyed by the ``build-assets --parts`` names.
BUILTIN_ASSETS: dict[str, BuiltinAsset] = {
    "tokenizer": BuiltinAsset("watch_tokenizer", "watch_tokenizer", "tokenizer.json", 0.1),
    "encoder": BuiltinAsset("watch_encoder", "siglip_watch_64", "config.json", 6.0),
    "vq": BuiltinAsset("watch_vq", "vq_watch_64", "config.json", 8.0),
}


class BuiltinAssetMissing(FileNotFoundError):
    """A ``builtin`` weight is neither shipped nor cached."""


def cache_root() -> Path:
    return Path(os.environ.get("UNIFIED_VLM_CACHE", Path.home() / ".cache" / "unified_vlm"))


def shipped(name: str) -> Path | None:
    """The shipped asset directory ``name`` if it exists and is complete, else None."""
    path = ASSETS_DIR / name
    return path if path.is_dir() and any(path.iterdir()) else None


def cached(name: str) -> Path:
    return cache_root() / name


def _asset(kind: str) -> BuiltinAsset:
    if kind not in BUILTIN_ASSETS:
        raise ValueError(f"unknown built-in asset {kind!r}; known: {sorted(BUILTIN_ASSETS)}")
    return BUILTIN_ASSETS[kind]


def find_builtin(kind: str) -> Optional[Path]:
    """The shipped directory of ``kind``, else its complete cache directory, else None."""
    asset = _asset(kind)
    found = shipped(asset.shipped_name)
    if found is not None:
        return found
    target = cached(asset.cache_name)
    return target if (target / asset.marker).is_file() else None


def require_builtin(kind: str) -> Path:
    """:func:`find_builtin`, or an error that says how to make the missing weights."""
    found = find_builtin(kind)
    if found is None:
        asset = _asset(kind)
        raise BuiltinAssetMissing(
            f"built-in {kind} weights are missing: neither {ASSETS_DIR / asset.shipped_name} nor "
            f"{cached(asset.cache_name)} exists. The commands fit/validate/test/predict train and cache them "
            f"by themselves; elsewhere call unified_vlm.pretraining.build_assets.ensure_builtin({kind!r}) (about "
            f"{asset.minutes:g} CPU minutes) or run `python -m unified_vlm build-assets --parts {kind}`"
        )
    return found
