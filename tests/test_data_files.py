"""``data`` writes every PNG atomically (a killed run leaves no truncated image), warns about files
of an earlier run that the new records do not refer to, and respects the umask for the records."""
from __future__ import annotations

import os
import stat

import pytest

from unified_vlm.datamodules.materialize import StaleFilesWarning, main, materialize


def test_a_killed_run_leaves_no_truncated_png(tmp_path, monkeypatch):
    """The kill lands while the second image is being written: the first is whole, the second absent."""
    from PIL import Image

    real_save, calls = Image.Image.save, []

    def save_then_die(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n half")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        materialize(tmp_path, split="test", num_watches=3, image_size=16, progress=False)
    monkeypatch.undo()
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert images == ["000000.png"], images
    with Image.open(tmp_path / "images" / "000000.png") as image:
        image.load()


def test_a_rerun_warns_about_images_it_does_not_write(tmp_path, capsys):
    materialize(tmp_path, split="test", num_watches=3, image_size=16, progress=False)
    with pytest.warns(StaleFilesWarning, match=r"holds 1 file\(s\) this run did not write .*: images/000002.png"):
        materialize(tmp_path, split="test", num_watches=2, image_size=16, progress=False, overwrite=True)
    assert main(["--out", str(tmp_path), "--split", "test", "--num-watches", "2", "--image-size", "16",
                 "--format", "json", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "images/000002.png" in err and "test.jsonl" in err
    fresh = tmp_path / "fresh"
    assert main(["--out", str(fresh), "--split", "test", "--num-watches", "2", "--image-size", "16", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_records_file_respects_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = materialize(tmp_path / oct(umask), split="test", num_watches=1, image_size=16, progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    image = next((path.parent / "images").iterdir())
    assert stat.S_IMODE(image.stat().st_mode) == 0o666 & ~umask
