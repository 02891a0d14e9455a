"""Atomic writes: a reader (another process, a resumed run) never sees half a file or directory."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_json_atomically(path: str | os.PathLike, payload: Any) -> None:
    """``json.dump`` to a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


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
