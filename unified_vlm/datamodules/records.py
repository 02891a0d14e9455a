"""LLaVA-schema record files: reading, validation with precise errors, and a file-backed Dataset.

A record is ``{"task", "image", "conversations", ["id"], ["attributes"], ["watch"]}``; see
docs/data.md. Files are either a JSON array (what LLaVA and the paper's generator write) or JSON
Lines. Every record is validated on load, so a malformed file fails before training starts, with
a message naming the file, the line (JSONL, 1-based) or array element (0-based), and the problem.

Image paths follow one rule (``image_file``): relative to the image root and inside it once ``..``
and symlinks are resolved; absolute paths and paths that leave the root only with
``allow_outside_root`` (``data.allow_images_outside_root``). A records file is data that may come
from elsewhere; without the rule, ``"image": "/etc/hostname"`` or ``"../../x.png"`` would make a
run read any file the process can.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from unified_vlm.tokens import IMAGE_MARKER

KNOWN_TASKS = ("generation", "vqa", "caption")
REQUIRED_KEYS = ("task", "image", "conversations")
ROLES = ("human", "gpt")


class RecordError(ValueError):
    """A record file that cannot be used; the message names file, line or element, and problem."""


def _check_tasks(tasks: Sequence[str] | None) -> None:
    if tasks is None:
        return
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names, not the string {tasks!r}")
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {KNOWN_TASKS}")


def _parse(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed object) pairs; JSON array if the first non-space character is '['."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise RecordError(f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                          "record files must be UTF-8 encoded") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: line {err.lineno}: invalid JSON array: {err.msg}") from None
        return [(f"{path}: element {i}", item) for i, item in enumerate(items)]
    parsed = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((f"{path}: line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: line {number}: invalid JSON: {err.msg}") from None
    return parsed


def validate_record(record: Any, where: str) -> None:
    """Raise RecordError(f"{where}: ...") if ``record`` breaks the schema (its image file: ``image_file``)."""

    def fail(problem: str) -> None:
        raise RecordError(f"{where}: {problem}")

    if not isinstance(record, dict):
        fail(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        fail(f"missing required field(s) {missing}")
    task = record["task"]
    if task not in KNOWN_TASKS:
        fail(f"unknown task {task!r}; known tasks: {KNOWN_TASKS}")
    if not isinstance(record["image"], str) or not record["image"]:
        fail(f"'image' must be a non-empty path string, got {record['image']!r}")

    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        fail("'conversations' must be a non-empty list of turns")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            fail(f"turn {k} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}")
        expected = ROLES[k % 2]
        if turn["from"] != expected:
            fail(f"wrong turn order: turn {k} is from {turn['from']!r}, expected {expected!r} "
                 "(turns alternate human, gpt, starting with human)")
    if len(turns) % 2:
        fail("wrong turn order: the conversation must end with a 'gpt' turn")

    marker_count = sum(turn["value"].count(IMAGE_MARKER) for turn in turns)
    marker_turn = len(turns) - 1 if task == "generation" else 0
    where_marker = "the last gpt turn" if task == "generation" else "the first human turn"
    if marker_count != 1 or IMAGE_MARKER not in turns[marker_turn]["value"]:
        fail(f"a {task} record needs {IMAGE_MARKER} exactly once, in {where_marker}; found it {marker_count} time(s)")


def image_file(image: str, where: str, root: Path, allow_outside_root: bool = False, real_root: Path | None = None) -> Path:
    """The file a record's ``image`` names: ``root / image``. Raise RecordError naming ``where`` and
    the path if it is absolute, or leads outside ``root`` once ``..`` and symlinks are resolved,
    unless ``allow_outside_root`` (a trusted file whose images live elsewhere, e.g. a symlinked
    ``images/`` on another disk). The root itself may be a symlink: both sides are resolved
    (``real_root``: ``root.resolve()``, passed in when checking many records)."""
    if allow_outside_root:
        return root / image
    hint = "(image paths are relative to the image root; if this records file is trusted, set " \
           "data.allow_images_outside_root: true, or allow_outside_root=True)"
    if Path(image).is_absolute():
        raise RecordError(f"{where}: image path {image!r} is absolute {hint}")
    file = root / image
    real_root, real_file = real_root or root.resolve(), file.resolve()
    if not real_file.is_relative_to(real_root):
        raise RecordError(f"{where}: image path {image!r} leads outside the image root {real_root} (to {real_file}) {hint}")
    return file


def _image_files(located: Sequence[tuple[str, dict]], root: Path, allow_outside_root: bool) -> dict[Path, str]:
    """Each image file the records name (checked by ``image_file``), with the first record naming it.
    Three records usually share one image: each path is resolved, and each file opened, once."""
    real_root = root.resolve()
    named: dict[str, Path] = {}
    files: dict[Path, str] = {}
    for where, record in located:
        if record["image"] not in named:
            named[record["image"]] = image_file(record["image"], where, root, allow_outside_root, real_root)
            files.setdefault(named[record["image"]], where)
    return files


def image_problem(file: Path, decode: bool = False) -> str | None:
    """None if ``file`` is a readable image, else why not. Always PIL's ``verify``: the header and,
    for PNG, every chunk's checksum up to the end marker, with no pixel decoded (cheap enough for
    every load). ``decode=True`` then also decodes every pixel (``data --check``); neither check
    implies the other (a PNG cut after its pixel data decodes, but fails ``verify``)."""
    try:
        with Image.open(file) as image:
            image.verify()
        if decode:
            with Image.open(file) as image:  # verify() leaves the image unusable: open it again
                image.load()
    except FileNotFoundError:
        return "image file does not exist"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL: not an image, truncated
        return str(err) or type(err).__name__
    return None


def _image_problems(files: dict[Path, str], decode: bool) -> list[str]:
    return [f"{where}: image {file}: {problem}" for file, where in files.items()
            if (problem := image_problem(file, decode)) is not None]


def load_records(
    path: str | Path,
    tasks: Sequence[str] | None = None,
    check_images: bool = True,
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
) -> list[dict]:
    """Read and validate every record of a .json array or .jsonl file, then keep ``tasks`` only.

    Image paths are relative to ``image_root`` (default: the records file's folder) and must stay
    inside it (``image_file``); with ``check_images`` every image must exist and open as an image.
    """
    return [record for _, record in load_located_records(path, tasks, check_images, image_root, allow_outside_root)]


def load_located_records(
    path: str | Path,
    tasks: Sequence[str] | None = None,
    check_images: bool = True,
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
) -> list[tuple[str, dict]]:
    """``load_records`` with each record's location (``"<file>: line N"``), for later error messages.

    With ``check_images``, every image's header is read now (``image_problem``), so a file that is
    missing, truncated or not an image fails the load, naming it, instead of a batch mid-training."""
    _check_tasks(tasks)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    located = []
    for where, record in _parse(path):
        validate_record(record, where)
        located.append((where, record))
    files = _image_files(located, root, allow_outside_root)
    if check_images and (problems := _image_problems(files, decode=False)):
        raise RecordError(
            f"{path}: {len(problems)} of {len(files)} image(s) cannot be read: "
            + "; ".join(problem.removeprefix(f"{path}: ") for problem in problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + f". List them all: python -m unified_vlm data --check {path}")
    if tasks is not None:
        located = [(w, r) for w, r in located if r["task"] in tasks]
    return located


def check_record_images(path: str | Path, image_root: str | Path | None = None, allow_outside_root: bool = False) -> list[str]:
    """Decode every image a records file names; one ``"<file>: line N: image ...: problem"`` per bad image.

    Deeper than the header check of every load: every pixel is decoded, as training will."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    located = load_located_records(path, check_images=False, image_root=root, allow_outside_root=allow_outside_root)
    return _image_problems(_image_files(located, root, allow_outside_root), decode=True)


def check_prompt_lengths(located: Sequence[tuple[str, dict]], collator: Any) -> None:
    """Raise naming every generation prompt (``"<file>: line N"``, first 5) that cannot be answered
    within ``collator.max_length``: its encoded prompt (``collator.encode_prompt``) plus the image it
    generates (``num_generation_tokens`` between the image start and end tokens). Training refuses
    such a record; here a prompt file fails before any image is drawn."""
    max_length = getattr(collator, "max_length", None)
    if max_length is None or not hasattr(collator, "encode_prompt"):
        return
    image = int(getattr(collator, "num_generation_tokens", 0)) + 2
    long = []
    for where, record in located:
        prompt = len(collator.encode_prompt(record["conversations"], 0))
        if prompt + image > max_length:
            long.append(f"{where}: {prompt} prompt tokens + {image} for the image = {prompt + image}")
    if long:
        raise RecordError(
            f"{len(long)} prompt(s) do not fit max_length={max_length} (model.max_length): " + "; ".join(long[:5])
            + (" ..." if len(long) > 5 else "") + ". Shorten them (or train a model with a larger model.max_length)")


def load_image(path: str | Path, image_size: int | None = None) -> Image.Image:
    """An RGB image, resized with BICUBIC to ``image_size`` x ``image_size`` when it differs."""
    with Image.open(path) as raw:
        image = raw.convert("RGB")
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return image


class RecordDataset(torch.utils.data.Dataset):
    """Records from a file, with images loaded from disk.

    Items: ``{"id", "task", "conversations", "image" (PIL RGB), "image_path", "attributes"}``, the
    same form as ``WatchStream`` so the two are interchangeable; ``attributes`` is None for records
    that carry none (foreign datasets).
    """

    def __init__(
        self,
        path: str | Path,
        tasks: Sequence[str] | None = None,
        image_root: str | Path | None = None,
        image_size: int | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.image_size = image_size
        located = load_located_records(self.path, tasks=tasks, check_images=True, image_root=self.image_root,
                                       allow_outside_root=allow_outside_root)
        self.locations = [where for where, _ in located]
        self.records = [record for _, record in located]
        if not self.records:
            raise RecordError(f"{self.path}: no records" + (f" for tasks {list(tasks)}" if tasks is not None else ""))

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, i: int) -> Image.Image:
        path = self.image_root / self.records[i]["image"]
        try:
            return load_image(path, self.image_size)
        except (OSError, SyntaxError, ValueError) as err:  # PIL: truncated / corrupt files
            raise RecordError(f"{self.locations[i]}: image {path} cannot be read: {err} "
                              f"(check every image first: python -m unified_vlm data --check {self.path})") from err

    def check_lengths(self, count_tokens, max_length: int) -> None:
        """Raise naming every record (file and line, first 5) longer than ``max_length`` tokens."""
        long = [(where, n) for where, record in zip(self.locations, self.records)
                if (n := count_tokens(record)) > max_length]
        if long:
            shown = "; ".join(f"{where}: {n} tokens" for where, n in long[:5])
            raise RecordError(f"{len(long)} record(s) exceed max_length={max_length} (model.max_length): {shown}"
                              + (" ..." if len(long) > 5 else ""))

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        return {
            "id": record.get("id", f"{self.path.stem}-{i}"),
            "task": record["task"],
            "conversations": record["conversations"],
            "image": self._image(i),
            "image_path": record["image"],
            "attributes": record.get("attributes"),
        }
