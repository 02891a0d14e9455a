"""Record files that break: errors name the file and line, images can be
checked up front, over-long records are reported when the file loads; the regression head's loss
is selectable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from unified_vlm.cli import main
from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.materialize import materialize
from unified_vlm.datamodules.records import RecordDataset, RecordError, check_record_images
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
    image.write_bytes(image.read_bytes()[:60])
    dataset = RecordDataset(records)
    with pytest.raises(RecordError, match=rf"{records}: line 1: image {image} cannot be read: .*data --check"):
        dataset[0]
    problems = check_record_images(records)
    assert problems and all(p.startswith(f"{records}: line ") and str(image) in p for p in problems)
    assert main(["data", "--check", str(records)]) == 2
    assert f"{records}: line 1: image {image}" in capsys.readouterr().err


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
