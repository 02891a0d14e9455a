"""``fit`` with ``test_after_fit`` checks what its post-fit test needs (the watch reader, the
Inception weights) before training, instead of training to the end and failing in the test."""
from __future__ import annotations

from pathlib import Path

import yaml
from test_cli_validation import shrink

from unified_vlm.cli import main


def fit_args(tmp_path: Path, vq_dir: str) -> list[str]:
    args = shrink(tmp_path, vq_dir)
    raw = yaml.safe_load(Path(args[-1]).read_text())
    raw["test_after_fit"] = True
    raw["generation_probe"] = {"max_images": 0}
    Path(args[-1]).write_text(yaml.safe_dump(raw))
    return ["fit", *args]


def test_a_missing_builtin_reader_fails_before_training(tmp_path, tiny_vq_dir, monkeypatch, capsys):
    import unified_vlm.assets as assets

    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path / "no_assets")
    monkeypatch.setenv("UNIFIED_VLM_CACHE", str(tmp_path / "empty_cache"))
    assert main(fit_args(tmp_path, tiny_vq_dir)) == 2
    err = capsys.readouterr().err
    assert "the test after fit (test_after_fit) could not score the trained model: no built-in watch reader" in err
    assert "--test_after_fit false" in err
    assert not list(tmp_path.rglob("*.ckpt")), "it trained before failing"


def test_a_missing_reader_directory_or_inception_file_fails_before_training(tmp_path, tiny_vq_dir, capsys):
    assert main(fit_args(tmp_path, tiny_vq_dir) + ["--report.reader", str(tmp_path / "no_reader")]) == 2
    assert f"watch reader directory '{tmp_path / 'no_reader'}' does not exist" in capsys.readouterr().err
    assert main(fit_args(tmp_path, tiny_vq_dir) + ["--report.inception_weights", str(tmp_path / "pt_inception.pth")]) == 2
    assert "report.inception_weights" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_broken_image_of_the_test_records_fails_before_training(tmp_path, tiny_vq_dir, capsys):
    """data.test_records is read after fit; its images are opened before training, as the train and val ones are."""
    from unified_vlm.datamodules.materialize import materialize

    records = Path(materialize(tmp_path / "watch_test", split="test", num_watches=2, image_size=16, progress=False))
    broken = records.parent / "images" / "000001.png"
    broken.write_text("not a picture")
    assert main(fit_args(tmp_path, tiny_vq_dir) + ["--data.test_records", str(records)]) == 2
    err = capsys.readouterr().err
    assert f"test_after_fit) reads data.test_records: {records}: 1 of 2 image(s) cannot be read: line 4: image {broken}" in err
    assert not list(tmp_path.rglob("*.ckpt")), "it trained before failing"
