"""Where built-in weights live: shipped inside the package, else a per-user cache.

The tiny default needs a text tokenizer, a pretrained watch encoder and a VQ tokenizer. Small
versions ship in ``unified_vlm/assets/``; when one is absent (a trimmed install, another image
size) it is trained once by the project's own code and cached under ``$UNIFIED_VLM_CACHE``
(default ``~/.cache/unified_vlm``), so nothing is ever downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN = "builtin"


def cache_root() -> Path:
    return Path(os.environ.get("UNIFIED_VLM_CACHE", Path.home() / ".cache" / "unified_vlm"))


def shipped(name: str) -> Path | None:
    """The shipped asset directory ``name`` if it exists and is complete, else None."""
    path = ASSETS_DIR / name
    return path if path.is_dir() and any(path.iterdir()) else None


def cached(name: str) -> Path:
    return cache_root() / name
