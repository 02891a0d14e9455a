"""The benchmark scripts keep running against the current code (tiny settings, a few steps)."""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from unified_vlm.datamodules.watch import CORNERS, sample_watch
from unified_vlm.tokens import IMAGE_MARKER

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mix", ["position", "position-turns", "all-first-turn", "all"])
def test_position_binding_question_mixes(mix):
    bench = load("position_binding")
    rng = random.Random(0)
    for index in range(40):
        attrs = sample_watch(0, "train", index)
        turns = bench.conversation(mix, attrs, rng)
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith(IMAGE_MARKER) and all(IMAGE_MARKER not in t["value"] for t in turns[1:])
        if mix in ("position", "all-first-turn"):
            assert len(turns) == 2
        if mix.startswith("position"):
            assert all(t["value"] in CORNERS for t in turns[1::2])
            for question, reply in zip(turns[::2], turns[1::2]):
                item = "battery" if "battery" in question["value"].lower() else "weather"
                assert reply["value"] == (attrs.battery_pos if item == "battery" else attrs.weather_pos)


def test_position_binding_runs(monkeypatch, capsys):
    bench = load("position_binding")
    monkeypatch.setattr(sys, "argv", ["position_binding.py", "--questions", "all", "--steps", "2", "--every", "1",
                                      "--val-watches", "16", "--batch-size", "4", "--set", "backbone.options.num_heads=8"])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("all: ") and len(lines) == 3
    for line in lines[1:]:
        accuracy = float(line.split("position exact match")[1].split()[0])
        assert 0.0 <= accuracy <= 1.0


def test_generation_speed_runs_on_a_checkpoint(tmp_path, tiny_vq_dir, monkeypatch, capsys):
    from test_cli import MAIN_CONFIG, tiny_overrides
    from unified_vlm.cli import main as cli_main

    tiny = tiny_overrides(tmp_path, tiny_vq_dir)
    cli_main(["fit", "--config", str(MAIN_CONFIG), "--config", str(tiny), "--test_after_fit", "false"])
    capsys.readouterr()
    ckpt = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    monkeypatch.setattr(sys, "argv", ["generation_speed.py", "--ckpt", str(ckpt), "--n", "4", "--batch-size", "2",
                                      "--image-size", "16"])
    load("generation_speed").main()
    out = capsys.readouterr().out
    assert "of 4 watches in" in out and "reader Fréchet distance" in out
