"""Write a split of the watch dataset to disk (PNG images + a records file), and the ``data`` command.

The files hold exactly what ``WatchStream`` yields for the same arguments (PNG is lossless), so
training from disk and training on the fly are interchangeable. Layout::

    out_dir/images/000000.png ...   one image per watch, shared by its three records
    out_dir/images/000000-biased.png  a knowledge-transfer variant's changed understanding watch
    out_dir/images/extra/000000.png   a data-scaling variant's new watches
    out_dir/<split>.jsonl           (or <split>.json, a JSON array as LLaVA writes)

Under a ``DataVariant`` (``--variant``) the files are, the same way, exactly the records and
pictures that ``WatchStream(..., variant=...)`` yields for the split, in its order.

Every file is written beside its target and renamed into place (a killed run leaves no half PNG),
with the permissions the umask gives. A rerun into a folder holding files it does not write
(images of a larger earlier run, the split's records in the other format) warns, naming them
(``StaleFilesWarning``): they are left in place, nothing refers to them; remove them or use a
fresh folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

from unified_vlm.datamodules.streams import WatchStream
from unified_vlm.datamodules.variants import DataVariant, VariantError


class StaleFilesWarning(UserWarning):
    """The output folder holds files this run did not write (left from an earlier run)."""


PAPER_SPLIT_SIZES = {"train": 60000, "test": 200}  # watches per split in the paper (1.4)
FORMATS = ("jsonl", "json")


def _progress(items: Iterable[int], total: int, enabled: bool, description: str) -> Iterable[int]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=description, unit="record")


def _write_atomically(target: Path, records: list[dict], fmt: str) -> None:
    """Write to a temporary file in the same folder, then rename, so no half-written file is left."""
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            if fmt == "json":
                json.dump(records, f, indent=1)
            else:
                for record in records:
                    f.write(json.dumps(record) + "\n")
        from unified_vlm.files import file_mode

        os.chmod(temp_name, file_mode())  # mkstemp makes it private (0600); the umask decides, as for the images
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _save_png_atomically(image, target: Path) -> None:
    """``image.save`` to a temporary file beside ``target``, then rename: a killed run leaves no truncated PNG."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        image.save(temp, format="PNG")
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _stale_files(out_dir: Path, written: set[str]) -> list[str]:
    """Files under ``out_dir`` (relative paths) that this run did not write, other splits' records aside."""
    stale = []
    for path in sorted(out_dir.rglob("*")):
        relative = path.relative_to(out_dir).as_posix()
        if path.is_file() and relative not in written:
            stale.append(relative)
    return stale


def _other_split_record_files(out_dir: Path, split: str) -> list[str]:
    """Names of record files (JSON mentioning "conversations" early on) written for another split."""
    if not out_dir.is_dir():
        return []
    names = []
    for path in sorted(out_dir.iterdir()):
        if path.suffix in (".json", ".jsonl") and path.stem != split and path.is_file():
            with path.open(encoding="utf-8", errors="replace") as f:
                if '"conversations"' in f.read(4096):
                    names.append(path.name)
    return names


def materialize(
    out_dir: str | Path,
    split: str = "train",
    num_watches: int | None = None,
    seed: int = 0,
    image_size: int = 224,
    fmt: str = "jsonl",
    paper_hours: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    variant: DataVariant | dict | None = None,
) -> Path:
    """Render ``num_watches`` watches of ``split`` into ``out_dir``; return the records file path.

    ``variant`` (a ``DataVariant`` or its mapping) writes that dataset variant instead of the
    standard data: exactly what the streamed split yields under it, all three tasks.

    ``num_watches`` defaults to the paper's size for "train" (60,000) and "test" (200). Refuses to
    replace an existing records file unless ``overwrite``, and refuses a folder that already holds
    another split's records, because both would share ``images/<index>.png``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if num_watches is None:
        if split not in PAPER_SPLIT_SIZES:
            raise ValueError(f"num_watches is required for split {split!r} (defaults exist for {list(PAPER_SPLIT_SIZES)})")
        num_watches = PAPER_SPLIT_SIZES[split]
    if num_watches < 1:
        raise ValueError(f"num_watches must be at least 1, got {num_watches}")

    out_dir = Path(out_dir)
    target = out_dir / f"{split}.{fmt}"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    other_splits = _other_split_record_files(out_dir, split)
    if other_splits:
        raise FileExistsError(
            f"{out_dir} already holds records of another split ({', '.join(other_splits)}); its images/ would be "
            "overwritten. Use one folder per split."
        )

    stream = WatchStream(split=split, num_watches=num_watches, seed=seed, image_size=image_size, paper_hours=paper_hours,
                         variant=DataVariant.coerce(variant))
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records, written = [], set()
    for i in _progress(range(len(stream)), len(stream), progress, f"{split} records"):
        record = stream.record(i)
        if record["image"] not in written:  # the records of one watch share its picture
            path = out_dir / record["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_png_atomically(stream.render(record), path)
            written.add(record["image"])
        records.append(record)
    _write_atomically(target, records, fmt)
    stale = _stale_files(out_dir, {Path(name).as_posix() for name in written} | {target.name})
    if stale:
        shown = ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else "")
        warnings.warn(
            f"{out_dir} holds {len(stale)} file(s) this run did not write and {target.name} does not refer to: {shown}. "
            "They are left from an earlier run; remove them (or write into a fresh folder) so the folder holds only this "
            "split", StaleFilesWarning, stacklevel=2)
    return target


def load_variant(text: str) -> DataVariant:
    """A DataVariant from a YAML/JSON file or inline YAML: the variant itself or a config with ``data.variant``."""
    import yaml

    path = Path(text)
    source = path.read_text(encoding="utf-8") if path.is_file() else text
    if not path.is_file() and text.endswith((".yaml", ".yml", ".json")):
        raise VariantError(f"--variant: no file {text}")
    try:
        mapping = yaml.safe_load(source)
    except yaml.YAMLError as err:
        raise VariantError(f"--variant: not valid YAML: {err}") from None
    return DataVariant.from_mapping(mapping)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unified_vlm data",
        description=(
            "Render the synthetic smart-watch dataset (docs/paper.md section 1) to OUT: images/<index>.png and "
            "<split>.jsonl (or .json), three records (generation, vqa, caption) per watch. The output is "
            "deterministic in (seed, split, index) and identical to what the streamed dataset yields."
        ),
    )
    parser.add_argument("--out", type=Path, help="output folder (one folder per split); required unless --check")
    parser.add_argument("--check", type=Path, metavar="RECORDS",
                        help="instead of rendering: validate RECORDS (.json/.jsonl) and decode every image it names")
    parser.add_argument("--image-root", type=Path, default=None, help="with --check: image folder (default: the file's folder)")
    parser.add_argument("--allow-images-outside-root", action="store_true",
                        help="with --check: accept absolute image paths and ones that leave the image folder "
                             "(as data.allow_images_outside_root: true; docs/data.md)")
    parser.add_argument("--split", default="train", help="split name; different splits never share a watch (default: train)")
    parser.add_argument(
        "--num-watches", type=int, default=None,
        help="number of watches (3 records each); default: the paper's 60000 for train, 200 for test",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    parser.add_argument("--image-size", type=int, default=224, help="square image side in pixels, drawn natively (default: 224)")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="JSON Lines or a JSON array (default: jsonl)")
    parser.add_argument(
        "--paper-hours", action="store_true",
        help="sample the hour from 0..12 like the paper (00 and 12 look identical: label noise); default 1..12",
    )
    parser.add_argument(
        "--variant", default=None,
        help="a dataset variant (docs/data.md): a YAML file holding the variant or a training config with data.variant, "
             "or inline YAML such as '{bias: {attribute: weather, values: [sunny]}}'",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing records file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check is not None:
        return check_main(args.check, args.image_root, args.allow_images_outside_root)
    if args.out is None:
        parser.error("--out is required (or --check RECORDS)")
    try:
        variant = load_variant(args.variant) if args.variant is not None else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StaleFilesWarning)
            path = materialize(
                args.out, split=args.split, num_watches=args.num_watches, seed=args.seed, image_size=args.image_size,
                fmt=args.format, paper_hours=args.paper_hours, progress=not args.no_progress, overwrite=args.overwrite,
                variant=variant,
            )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        if issubclass(warning.category, StaleFilesWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print(path)
    return 0


def check_main(records: Path, image_root: Path | None, allow_outside_root: bool = False) -> int:
    """``data --check``: every record valid and every image decodable; problems name file and line."""
    from unified_vlm.datamodules.records import RecordError, check_record_images

    try:
        problems = check_record_images(records, image_root, allow_outside_root)
    except (RecordError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} image(s) cannot be read", file=sys.stderr)
        return 2
    print(f"{records}: every record and image is readable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
