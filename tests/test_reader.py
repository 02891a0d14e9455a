"""The watch reader: its contract on any square size, persistence, the training job, and the shipped
reader's accuracy on fresh renders of a split no training used, against fixed targets."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from unified_vlm.assets import ASSETS_DIR, shipped
from unified_vlm.datamodules.watch import CORNERS, WEATHERS, render_watch, sample_watch
from unified_vlm.evaluation.reader import (
    SHIPPED_READERS,
    WatchReader,
    WatchReaderConfig,
    decode,
    load_reader,
    reader_accuracy,
    to_tensor_batch,
)

TINY = WatchReaderConfig(face_size=32, face_channels=(8, 8), corner_scale=0.5, corner_channels=(8, 8), feature_dim=8,
                         polar_rows=6, polar_columns=60, polar_channels=(4, 8))
CHECK_SPLIT = "reader-check"  # never used by train-reader (reader-train, reader-val) or any model


def renders(n: int, size: int, split: str = "t"):
    return [render_watch(sample_watch(0, split, i), size) for i in range(n)]


@pytest.mark.parametrize("size", [32, 64, 224])
def test_reads_any_square_size_from_pil_or_tensor(size):
    torch.manual_seed(0)
    reader = WatchReader(TINY).eval()
    images = renders(3, size)
    readings = reader.read(images)
    assert len(readings) == 3
    r = readings[0]
    assert set(r) == {"hour", "minute", "second", "time", "weather", "battery", "weather_pos", "battery_pos", "is_watch"}
    assert 1 <= r["hour"] <= 12 and 0 <= r["minute"] < 60 and 0 <= r["battery"] <= 100
    assert r["weather"] in WEATHERS and r["weather_pos"] in CORNERS and r["battery_pos"] != r["weather_pos"]
    assert 0.0 <= r["is_watch"] <= 1.0
    tensor = to_tensor_batch(images)
    assert reader.read(tensor) == readings
    assert reader.read((tensor * 255).round().byte()) == readings
    features = reader.features(images)
    assert features.shape == (3, reader.num_features) == (3, 6 * TINY.feature_dim)
    assert torch.allclose(features, reader.features(tensor))


def test_bad_images_fail_with_a_message():
    reader = WatchReader(TINY)
    with pytest.raises(ValueError, match="square"):
        reader.read(torch.rand(1, 3, 32, 48))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reader.read(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="N, 3, S, S"):
        reader.read(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="different sizes"):
        reader.read(renders(1, 32) + renders(1, 64))
    with pytest.raises(ValueError, match="face_size"):
        WatchReaderConfig(face_size=8)


def _logits(hour_col: float, minute_col: float, second_col: float, columns: int = 120) -> dict:
    hands = torch.full((1, 3, columns), -10.0)
    for k, col in enumerate((hour_col, minute_col, second_col)):
        lo = int(col) % columns
        frac = col - int(col)
        hands[0, k, lo], hands[0, k, (lo + 1) % columns] = 10 + torch.log(torch.tensor(1 - frac + 1e-6)), 10 + torch.log(torch.tensor(frac + 1e-6))
    corner = torch.full((1, 4, 5), -5.0)
    corner[0, 0, 1] = corner[0, 1, 4] = 5.0
    return {"hands": hands, "watch": torch.zeros(1), "corner": corner, "battery": torch.zeros(1, 4, 101)}


def test_decode_inverts_the_renderer_hand_angles():
    # 3 degrees per column: 03:20:30 -> hour hand at (3 + 20/60) * 30 = 100 deg, minute 120 deg, second 180 deg
    (r,) = decode(_logits(100 / 3, 40, 60))
    assert r["time"] == "03:20:30"
    (r,) = decode(_logits(0, 0, 119.5))  # between the last column and the first: 359.25 deg -> second 0
    assert r["time"] == "12:00:00" and r["hour"] == 12  # the 12 o'clock position is read as 12
    (r,) = decode(_logits(359 / 3 - 0.1, 59 * 2, 2))  # 11:59 -> hour hand just before 12
    assert r["time"] == "11:59:01"


def test_decode_keeps_the_two_corners_distinct():
    out = _logits(0, 0, 0)
    corner = torch.full((1, 4, 5), -5.0)
    corner[0, 2, 2] = 5.0  # bottom-left: cloudy, and (less sure) battery too
    corner[0, 2, 4] = 4.0
    corner[0, 1, 4] = 1.0  # top-right: battery, less likely than bottom-left's
    out["corner"] = corner
    out["battery"][0, 1, 40] = 10.0
    (r,) = decode(out)
    assert (r["weather"], r["weather_pos"], r["battery_pos"], r["battery"]) == ("cloudy", "bottom-left", "top-right", 40)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    reader = WatchReader(TINY).eval()
    reader.save_pretrained(tmp_path / "r", metadata={"steps": 3})
    loaded = WatchReader.from_pretrained(tmp_path / "r")
    images = to_tensor_batch(renders(2, 64))
    assert torch.equal(reader.features(images), loaded.features(images))
    assert loaded.training_info == {"steps": 3}
    with pytest.raises(FileNotFoundError, match="train-reader"):
        WatchReader.from_pretrained(tmp_path / "nothing")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    config["config"]["feature_dim"] = 16
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        WatchReader.from_pretrained(tmp_path / "r")
    config["config"]["colour"] = 1
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown WatchReaderConfig field"):
        WatchReader.from_pretrained(tmp_path / "r")


def test_training_batches_and_augmentation():
    from unified_vlm.pretraining.train_reader import ReaderTrainConfig, augment, make_batch

    cfg = ReaderTrainConfig(batch_size=32, negative_fraction=0.25, sizes=(64,), size_weights=(1.0,),
                            vq_fraction=1.0, blur_fraction=1.0, noise_fraction=1.0, jpeg_fraction=1.0, jitter_fraction=1.0)
    batch = make_batch(0, cfg, random.Random(0))
    n_pos = int(batch["is_watch"].sum())
    assert batch["image"].shape == (32, 3, 64, 64) and 0 < n_pos < 32
    assert batch["hour"].shape == batch["battery"].shape == (n_pos,) and batch["corner"].shape == (n_pos, 4)
    assert ((batch["corner"] > 0).sum(1) == 2).all()  # exactly the weather and the battery corner are occupied

    class Identity(torch.nn.Module):  # stands in for the VQ tokenizer: decode(encode(x)) == x
        config = type("C", (), {"image_size": 32})()

        def encode(self, x):
            return torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)

        def decode(self, x):
            return x

    out = augment(batch["image"], cfg, torch.Generator().manual_seed(0), Identity())
    assert out.shape == batch["image"].shape and out.min() >= 0 and out.max() <= 1
    assert (out - batch["image"]).abs().mean() > 0.01  # every degradation applied
    clean = augment(batch["image"], ReaderTrainConfig(vq_fraction=0, blur_fraction=0, noise_fraction=0,
                                                      jpeg_fraction=0, jitter_fraction=0), torch.Generator())
    assert torch.equal(clean, batch["image"])


def test_training_draws_styles_but_never_a_held_out_one(monkeypatch):
    import unified_vlm.pretraining.train_reader as job
    from unified_vlm.datamodules.watch import DEFAULT_STYLE

    drawn = []
    real = job.render_watch
    monkeypatch.setattr(job, "render_watch", lambda attrs, size, style=DEFAULT_STYLE: drawn.append(style) or real(attrs, size, style))
    cfg = job.ReaderTrainConfig(batch_size=64, negative_fraction=0.0, sizes=(32,), size_weights=(1.0,),
                                style_fraction=0.5, hold_out=("icons=paper", "battery_color=purple"))
    for step in range(4):
        job.make_batch(step, cfg, random.Random(step))
    styled = [s for s in drawn if s != DEFAULT_STYLE]
    assert 0.3 < len(styled) / len(drawn) < 0.8
    assert {s.icons for s in styled} == {"default", "flat"} and "purple" not in {s.battery_color for s in styled}
    assert {s.battery_bar for s in styled} == {"short", "paper"} and {s.font for s in styled} == {"default", "large", "bitmap"}
    drawn.clear()
    job.make_batch(0, job.ReaderTrainConfig(batch_size=16, negative_fraction=0.0, sizes=(32,), size_weights=(1.0,)),
                   random.Random(0))
    assert set(drawn) == {DEFAULT_STYLE}  # style_fraction 0: the default look only
    with pytest.raises(ValueError, match="leaves no value of \\['font'\\]"):
        job.training_style_choices(job.ReaderTrainConfig(hold_out=("font=default", "font=large", "font=bitmap")))


def test_style_accuracy_covers_every_variation_and_marks_the_held_out_one():
    from unified_vlm.datamodules.watch import STYLE_CHOICES, style_variations
    from unified_vlm.pretraining.train_reader import ReaderTrainConfig, style_accuracy

    variations = style_variations()
    assert len(variations) == 1 + sum(len(v) - 1 for v in STYLE_CHOICES.values())
    torch.manual_seed(0)
    report = style_accuracy(WatchReader(TINY).eval(), ReaderTrainConfig(hold_out=("icons=paper",)), n=2)
    assert list(report) == list(variations)
    assert [name for name, row in report.items() if row["held_out"]] == ["icons=paper"]
    assert set(report["battery_bar=paper"]) == {"held_out", "64", "224"}


def test_reader_check_command_reports_each_style(capsys):
    from unified_vlm.evaluation.reader import main as check

    assert check(["--n", "2", "--sizes", "32", "--styles", "default,icons=paper"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["style"] for row in rows] == ["default", "icons=paper"]
    with pytest.raises(SystemExit):
        check(["--n", "2", "--styles", "icons=pink"])


def test_train_reader_command_writes_a_loadable_reader(tmp_path):
    from unified_vlm.cli import main

    out = tmp_path / "reader"
    code = main(["train-reader", "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--vq-tokenizer", "none",
                 "--val-size", "4", "--sizes", "32", "--size-weights", "1", "--reader-face-size", "32",
                 "--reader-face-channels", "8,8", "--reader-corner-channels", "8,8", "--reader-corner-scale", "0.5",
                 "--reader-feature-dim", "8", "--reader-polar-rows", "6", "--reader-polar-columns", "60",
                 "--reader-polar-channels", "4,8", "--precision", "32"])
    assert code == 0
    reader = WatchReader.from_pretrained(out)
    assert reader.config == TINY
    assert reader.training_info["steps"] == 2 and set(reader.training_info["val"]) == {"64", "224"}
    assert len(reader.read(renders(2, 48))) == 2


# ------------------------------------------------------------------------- the shipped readers
needs_reader = pytest.mark.skipif(any(shipped(asset) is None for asset in SHIPPED_READERS.values()),
                                  reason="a shipped reader is missing")
READERS = list(SHIPPED_READERS)  # builtin (default look) and all_styles


@needs_reader
@pytest.mark.parametrize("name", READERS)
def test_shipped_readers_are_small_and_found_by_name(name):
    size = sum(p.stat().st_size for p in (ASSETS_DIR / SHIPPED_READERS[name]).iterdir())
    assert size < 5 * 1024 * 1024
    assert isinstance(load_reader(name), WatchReader)


@needs_reader
@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("size", [64, 224])
def test_shipped_readers_meet_the_targets_on_fresh_renders(name, size):
    """Targets: weather and both corners >= 0.99, time score >= 0.97, battery MAE <= 3."""
    acc = reader_accuracy(load_reader(name), CHECK_SPLIT, 200, size)
    assert acc["weather"] >= 0.99 and acc["weather_pos"] >= 0.99 and acc["battery_pos"] >= 0.99, acc
    assert acc["time"] >= 0.97, acc
    assert acc["battery_mae"] <= 3.0, acc
    assert acc["is_watch"] == 1.0, acc


@needs_reader
@pytest.mark.parametrize("look", ["icons=paper", "battery_color=purple", "font=bitmap"])
def test_all_styles_reader_meets_the_targets_in_other_looks(look):
    """The paper-like cloudy icon (the default reader reads it as sunny), the battery colour held out
    of the all_styles reader's training (the default reader's battery error there: 23 points), and
    the old bitmap font, at 224 px (both sizes in docs/evaluation.md)."""
    from unified_vlm.datamodules.watch import style_variations

    reader = load_reader("all_styles")
    assert "battery_color=purple" in reader.training_info["config"]["hold_out"]
    acc = reader_accuracy(reader, CHECK_SPLIT, 200, 224, style=style_variations()[look])
    assert acc["weather"] >= 0.99 and acc["weather_pos"] >= 0.99 and acc["battery_pos"] >= 0.99, acc
    assert acc["time"] >= 0.97 and acc["battery_mae"] <= 3.0, acc


@needs_reader
@pytest.mark.parametrize("name", READERS)
def test_shipped_readers_reject_non_watches(name):
    from unified_vlm.pretraining.train_reader import _negative

    rng = random.Random(123)
    images = [_negative(rng, 64, i) for i in range(60)]
    accepted = [r["is_watch"] > 0.5 for r in load_reader(name).read(images)]
    assert np.mean(accepted) < 0.1


@needs_reader
@pytest.mark.parametrize("name", READERS)
def test_shipped_readers_reject_decoded_random_vq_codes(name):
    """What an untrained VQ-output model draws (random codes through the shipped decoder) is not a watch."""
    from unified_vlm.models.builders import build_vq_tokenizer

    torch.manual_seed(0)
    vq = build_vq_tokenizer("builtin")
    with torch.no_grad():
        images = vq.decode(torch.randint(0, vq.codebook_size, (100, vq.num_tokens))).clamp(0, 1)
    accepted = [r["is_watch"] > 0.5 for r in load_reader(name).read(images)]
    assert np.mean(accepted) < 0.15
