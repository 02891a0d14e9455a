"""Record files that break: errors name the file and line, every image is opened when the file
loads (and decoded by ``data --check``), image paths stay inside the image root, over-long records
are reported when the file loads; the regression head's loss is selectable."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from unified_vlm.cli import main
from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.materialize import materialize
from unified_vlm.datamodules.records import RecordDataset, RecordError, check_record_images, load_records
from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule


@pytest.fixture()
def records(tmp_path) -> Path:
    return Path(materialize(tmp_path / "watch", split="train", num_watches=2, image_size=16, progress=False))


def test_a_non_utf8_byte_names_file_line_and_column(records):
    lines = records.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"\"value\": \"", b"\"value\": \"\xff", 1)
    assert b"\xff" in lines[1]
    records.write_bytes(b"".join(lines))
    with pytest.raises(RecordError, match=rf"{records}: line 2, column \d+: not UTF-8 text \(byte 0xff\)"):
        RecordDataset(records)


def test_a_truncated_image_names_the_record_and_data_check_finds_it(records, capsys):
    first = json.loads(records.read_text().splitlines()[0])
    image = records.parent / first["image"]
    dataset = RecordDataset(records)
    good = image.read_bytes()
    image.write_bytes(good[:60])  # broken after the load's check: the batch that reads it names it
    with pytest.raises(RecordError, match=rf"{records}: line 1: image {image} cannot be read: .*data --check"):
        dataset[0]
    with pytest.raises(RecordError, match=rf"{records}: 1 of 2 image\(s\) cannot be read: line 1: image {image}: "):
        RecordDataset(records)  # broken before: the load refuses
    problems = check_record_images(records)
    assert problems and all(p.startswith(f"{records}: line ") and str(image) in p for p in problems)
    assert main(["data", "--check", str(records)]) == 2
    assert f"{records}: line 1: image {image}" in capsys.readouterr().err


def _rewrite_image(records: Path, line: int, image: str) -> None:
    lines = records.read_text().splitlines()
    lines[line - 1] = json.dumps({**json.loads(lines[line - 1]), "image": image})
    records.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("image", ["/etc/hostname", "../../x.png", "images/../../x.png", "link.png"])
def test_an_image_path_outside_the_image_root_is_refused_naming_file_line_and_path(records, image, tmp_path, capsys):
    """Absolute paths, ``..`` out of the root and a symlink out of it: refused at load, by the DataModule
    and by ``data --check``, unless data.allow_images_outside_root says the file is trusted."""
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16)).save(outside)
    (records.parent / "link.png").symlink_to(outside)
    _rewrite_image(records, 2, image)
    problem = "is absolute" if image.startswith("/") else "leads outside the image root"
    with pytest.raises(RecordError, match=rf"{records}: line 2: image path '{re.escape(image)}' {problem}.*allow_images_outside_root"):
        RecordDataset(records)
    assert main(["data", "--check", str(records)]) == 2
    assert f"{records}: line 2: image path '{image}' {problem}" in capsys.readouterr().err
    dm = UnifiedDataModule(collator=object(), train_records=str(records), val_records=str(records), image_size=16, num_workers=0)
    with pytest.raises(RecordError, match="line 2: image path"):
        dm.setup("fit")

    # a trusted file may name an image anywhere, but it must still be an image
    _rewrite_image(records, 2, {"/etc/hostname": str(outside), "link.png": "link.png"}.get(image, "../outside.png"))
    assert len(RecordDataset(records, allow_outside_root=True)) == 6
    assert main(["data", "--check", str(records), "--allow-images-outside-root"]) == 0
    dm = UnifiedDataModule(collator=object(), train_records=str(records), val_records=str(records), image_size=16,
                           num_workers=0, allow_images_outside_root=True)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6


def test_a_symlinked_image_root_is_inside_itself(records, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(records.parent, target_is_directory=True)
    assert len(RecordDataset(alias / records.name)) == 6
    assert len(RecordDataset(records, image_root=alias)) == 6


def test_images_that_are_not_readable_images_fail_the_load_naming_a_few_and_the_count(tmp_path):
    """Every image is opened (header and PNG checksums) when the file loads, so training never starts
    on a file whose images would fail mid-run; the message lists 5 and counts them all."""
    records = Path(materialize(tmp_path / "watch", split="train", num_watches=8, image_size=16, progress=False))
    images = sorted((records.parent / "images").glob("*.png"))
    images[0].write_text("not a picture")
    for image in images[1:7]:
        image.write_bytes(image.read_bytes()[:-12])  # no IEND chunk: still decodes, but is not a whole PNG
    images[7].unlink()
    with pytest.raises(RecordError) as err:
        RecordDataset(records)
    message = str(err.value)
    assert message.startswith(f"{records}: 8 of 8 image(s) cannot be read: line 1: image {images[0]}: cannot identify image file")
    assert len(re.findall(r"line \d+: image ", message)) == 5 and "; and 3 more. List them all: python -m unified_vlm data --check" in message
    assert load_records(records, check_images=False)  # the records themselves are fine
    problems = check_record_images(records)
    assert len(problems) == 8 and "image file does not exist" in problems[-1]


def test_data_check_passes_a_good_file(records, capsys):
    assert main(["data", "--check", str(records)]) == 0
    assert "every record and image is readable" in capsys.readouterr().out


def test_over_long_records_are_reported_when_the_file_loads(records):
    from unified_vlm.models.builders import build_text_tokenizer

    collator = ConversationCollator(build_text_tokenizer("builtin"), num_understanding_tokens=4, num_generation_tokens=16, max_length=40)
    dm = UnifiedDataModule(collator=collator, train_records=str(records), val_records=str(records), image_size=16, num_workers=0)
    with pytest.raises(RecordError, match=rf"exceed max_length=40 \(model.max_length\): {records}: line \d+: \d+ tokens"):
        dm.setup("fit")


def test_feature_regression_takes_its_loss_type_from_the_config(tiny_model_kwargs):
    from unified_vlm.models.unified import UnifiedVLM

    image_output = {"space": "features", "head": "feature_regression", "tokenizer": None, "renderer": "retrieval:4",
                    "loss_weight": 1.0, "head_options": {"loss_type": "mse"}}
    model = UnifiedVLM(**{**tiny_model_kwargs, "image_output": image_output})
    assert model.head.loss_type == "mse"
    with pytest.raises(ValueError, match="loss_type"):
        UnifiedVLM(**{**tiny_model_kwargs, "image_output": {**image_output, "head_options": {"loss_type": "l1"}}})


def test_fit_on_a_malformed_records_file_exits_2_naming_it(tmp_path, tiny_vq_dir, capsys):
    from test_checkpoint_safety import config

    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x", "image": "nope.png", "conversations": []}]')
    args = config(tmp_path, tiny_vq_dir, "bad") + ["--data.train_records", str(bad), "--data.curriculum", "null"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: element 0: missing required field(s)" in err and "Traceback" not in err
