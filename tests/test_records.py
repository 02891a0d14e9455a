"""LLaVA-schema record files: loading, precise validation errors, the file-backed dataset, and materialize."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unified_vlm.datamodules.materialize import main, materialize
from unified_vlm.datamodules.records import RecordDataset, RecordError, load_records
from unified_vlm.datamodules.streams import WatchStream


def good_records() -> list[dict]:
    return [
        {
            "id": "a-vqa", "task": "vqa", "image": "img/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat time is it?"}, {"from": "gpt", "value": "07:13:07"},
                {"from": "human", "value": "Where is the battery?"}, {"from": "gpt", "value": "top-left"},
            ],
        },
        {
            "task": "generation", "image": "img/a.png",
            "conversations": [{"from": "human", "value": "Draw a watch."}, {"from": "gpt", "value": "Here.\n<image>"}],
        },
        {
            "task": "caption", "image": "img/b.png", "attributes": {"hour": 7},
            "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A watch."}],
        },
    ]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "img" / "a.png")
    Image.new("RGBA", (40, 20), (200, 100, 0, 255)).save(tmp_path / "img" / "b.png")
    return tmp_path


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in items) + "\n")
    return path


def write_array(path: Path, items: list) -> Path:
    path.write_text(json.dumps(items, indent=2))
    return path


def test_json_array_and_jsonl_give_the_same_records(image_dir):
    array = load_records(write_array(image_dir / "records.json", good_records()))
    lines = load_records(write_jsonl(image_dir / "records.jsonl", good_records()))
    sniffed = load_records(write_array(image_dir / "records.txt", good_records()))  # format from content
    assert array == lines == sniffed == good_records()


def test_blank_lines_task_filter_and_image_options(image_dir, tmp_path):
    items = good_records()
    path = write_jsonl(image_dir / "r.jsonl", [items[0], "", "   ", items[1], items[2]])
    assert [r["task"] for r in load_records(path)] == ["vqa", "generation", "caption"]
    assert [r["task"] for r in load_records(path, tasks=["caption", "vqa"])] == ["vqa", "caption"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = write_jsonl(elsewhere / "r.jsonl", items)
    with pytest.raises(RecordError, match="image file does not exist"):
        load_records(moved)
    assert load_records(moved, check_images=False) == items
    assert load_records(moved, image_root=image_dir) == items
    with pytest.raises(ValueError, match="unknown task"):
        load_records(path, tasks=["segmentation"])


def _broken(kind: str) -> tuple[object, str]:
    """(bad record or raw line, a fragment the error message must contain)."""
    record = good_records()[0]
    if kind == "invalid json":
        return '{"task": "vqa", "image": ', "invalid JSON"
    if kind == "missing field":
        del record["conversations"]
        return record, "missing required field(s) ['conversations']"
    if kind == "missing image":
        return {**record, "image": "img/nope.png"}, "image file does not exist"
    if kind == "unknown task":
        return {**record, "task": "segmentation"}, "unknown task 'segmentation'"
    if kind == "wrong turn order":
        return {**record, "conversations": record["conversations"][1:] + record["conversations"][:1]}, "wrong turn order"
    if kind == "odd number of turns":
        return {**record, "conversations": record["conversations"][:3]}, "must end with a 'gpt' turn"
    if kind == "image marker in the wrong turn":
        gen = good_records()[1]
        gen["conversations"][0]["value"] += " <image>"
        return gen, "in the last gpt turn; found it 2 time(s)"
    if kind == "not an object":
        return [1, 2], "expected a JSON object"
    raise AssertionError(kind)


KINDS = ["invalid json", "missing field", "missing image", "unknown task", "wrong turn order",
         "odd number of turns", "image marker in the wrong turn", "not an object"]


@pytest.mark.parametrize("kind", KINDS)
def test_jsonl_errors_name_file_line_and_problem(image_dir, kind):
    bad, problem = _broken(kind)
    path = write_jsonl(image_dir / "broken.jsonl", [good_records()[0], "", bad])
    with pytest.raises(RecordError) as err:
        load_records(path)
    message = str(err.value)
    assert "broken.jsonl" in message and "line 3" in message and problem in message, message


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "invalid json"])
def test_json_array_errors_name_file_element_and_problem(image_dir, kind):
    bad, problem = _broken(kind)
    path = write_array(image_dir / "broken.json", [good_records()[0], bad])
    with pytest.raises(RecordError) as err:
        load_records(path)
    message = str(err.value)
    assert "broken.json" in message and "element 1" in message and problem in message, message


def test_invalid_json_array_names_the_line(image_dir):
    path = image_dir / "broken.json"
    path.write_text('[\n  {"task": "vqa"},\n  {"task": \n]')
    with pytest.raises(RecordError, match=r"broken\.json: line 4: invalid JSON array"):
        load_records(path)


def test_filtered_out_records_are_still_validated(image_dir):
    bad, _ = _broken("wrong turn order")
    path = write_jsonl(image_dir / "r.jsonl", [good_records()[2], {**bad, "task": "vqa"}])
    with pytest.raises(RecordError, match="line 2"):
        load_records(path, tasks=["caption"])


def test_record_dataset_items(image_dir):
    dataset = RecordDataset(write_jsonl(image_dir / "r.jsonl", good_records()), image_size=16)
    assert len(dataset) == 3
    first, second, third = dataset[0], dataset[1], dataset[2]
    assert set(first) == {"id", "task", "conversations", "image", "image_path", "attributes"}
    assert first["id"] == "a-vqa" and second["id"] == "r-1"
    assert first["attributes"] is None and third["attributes"] == {"hour": 7}
    assert third["image"].mode == "RGB" and third["image"].size == (16, 16)
    assert third["image_path"] == "img/b.png"
    native = RecordDataset(image_dir / "r.jsonl", tasks=["vqa"])
    assert len(native) == 1 and native[0]["image"].size == (32, 32)
    assert native[0]["image"].getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(RecordError, match="no records"):
        RecordDataset(write_jsonl(image_dir / "only_vqa.jsonl", good_records()[:1]), tasks=["caption"])


# ----------------------------------------------------------------------------------------------
# Materialized data == streamed data


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_materialized_split_equals_the_stream(tmp_path, fmt):
    path = materialize(tmp_path / "test", split="test", num_watches=3, seed=5, image_size=64, fmt=fmt,
                       paper_hours=True, progress=False)
    assert path == tmp_path / "test" / f"test.{fmt}"
    assert sorted(p.name for p in (tmp_path / "test" / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    on_disk = RecordDataset(path)
    streamed = WatchStream(split="test", num_watches=3, seed=5, image_size=64, paper_hours=True)
    assert len(on_disk) == len(streamed) == 9
    assert load_records(path) == [streamed.record(i) for i in range(9)]
    for i in range(9):
        disk_item, stream_item = on_disk[i], streamed[i]
        assert disk_item.keys() == stream_item.keys()
        for key in disk_item.keys() - {"image"}:
            assert disk_item[key] == stream_item[key], key
        assert np.array_equal(np.asarray(disk_item["image"]), np.asarray(stream_item["image"]))


def test_materialize_refuses_to_overwrite_or_mix_splits(tmp_path):
    path = materialize(tmp_path, split="test", num_watches=1, image_size=32, progress=False)
    before = path.read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        materialize(tmp_path, split="test", num_watches=2, image_size=32, progress=False)
    assert path.read_text() == before
    materialize(tmp_path, split="test", num_watches=2, image_size=32, progress=False, overwrite=True)
    assert len(load_records(path)) == 6
    with pytest.raises(FileExistsError, match="another split"):
        materialize(tmp_path, split="train", num_watches=1, image_size=32, progress=False)
    assert not list(tmp_path.glob(".*.tmp"))


def test_data_command(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--split", "val", "--num-watches", "2", "--image-size", "32",
            "--format", "json", "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "val.json")
    assert len(load_records(tmp_path / "val.json")) == 6
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--paper-hours"]) == 0
    assert main(["--out", str(tmp_path / "x"), "--split", "val", "--no-progress"]) == 2  # no paper size for "val"
    assert "num_watches is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--paper-hours" in capsys.readouterr().out
