"""Where built-in weights live: shipped inside the package, else a per-user cache.

The tiny default needs a text tokenizer, a pretrained watch encoder and a VQ tokenizer. Small
versions ship in ``unified_vlm/assets/``; when one is absent (a trimmed install, another image
size) it is trained once by the project's own code and cached under ``$UNIFIED_VLM_CACHE``
(default ``~/.cache/unified_vlm``), so nothing is ever downloaded.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

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


def publish_dir(write: Callable[[str], object], directory: str, prefix: str, replace_existing: bool = True) -> None:
    """``write(tmp)`` into a temp dir beside ``directory``, then rename it into place, so a reader
    never sees half a directory. An existing ``directory`` is moved aside and deleted only after
    the new one is complete, and only with ``replace_existing`` (else the rename fails with
    OSError and the existing one stays). Files get the permissions a plain mkdir would give."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{prefix}_tmp_", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        for path, mode in [(tmp, 0o777)] + [(os.path.join(tmp, n), 0o666) for n in os.listdir(tmp)]:
            os.chmod(path, mode & ~umask)  # mkdtemp makes it private
        if os.path.exists(directory) and replace_existing:
            old = tempfile.mkdtemp(prefix=f".{prefix}_old_", dir=parent)
            os.replace(directory, os.path.join(old, "previous"))
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
