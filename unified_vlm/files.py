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


def file_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what ``open()`` would give a new file (``mkstemp`` gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely: truncated, corrupt, or holding code."""


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` of a file a user may have been handed: tensors and plain data only
    (``weights_only=True``), on the CPU. A file that would run code when unpickled, and a truncated or
    corrupt one, raise ``CheckpointError`` naming the file and what to do."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line
                       or "WeightsUnpickler error" in line), str(err).splitlines()[0] if str(err) else "")
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, which run code when "
            f"unpickled ({detail}). Checkpoints written by `python -m unified_vlm fit` hold none: use one of those, "
            "and only load files whose origin you trust") from None
    except (RuntimeError, EOFError, OSError) as err:
        text = str(err)
        if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        if isinstance(err, (EOFError, OSError)) or any(s in text for s in ("PytorchStreamReader", "zip archive",
                                                                            "mmap can only be used")):
            size = path.stat().st_size if path.is_file() else 0
            raise CheckpointError(
                f"{path} is truncated or corrupt ({size} bytes, not a complete checkpoint archive): it was "
                "probably cut off while being written or copied. Use another checkpoint (an earlier one of the run) "
                "or copy it again") from None
        raise
