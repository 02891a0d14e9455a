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


def test_generation_binding_with_a_curriculum_vqa_and_temperatures_then_its_plot(tmp_path, monkeypatch, capsys):
    import json

    bench = load("generation_binding")
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["generation_binding.py", "--steps", "2", "--every", "2", "--val-watches", "4", "--batch-size", "4",
                                      "--vqa-share", "0.5", "--curriculum-steps", "1", "--temperatures", "1,0.5", "--out", str(out)])
    bench.main()
    (row,) = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and set(row["vqa"]) == {"weather", "time", "battery", "battery_pos", "weather_pos"}
    for draw in ("cfg1_t1", "cfg1_t0.5"):
        assert 0.0 <= row[draw]["total"] <= 1.0 and 0.0 <= row[draw]["is_watch"] <= 1.0
    assert "curriculum 1 steps (all, position" in capsys.readouterr().out

    plot = load("binding_curves")
    monkeypatch.setattr(sys, "argv", ["binding_curves.py", str(out), "--draw", "cfg1_t0.5", "--label", "run=tiny", "--out",
                                      str(tmp_path / "curves.png")])
    plot.main()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "tiny" in capsys.readouterr().out


def test_train_mfu_runs(monkeypatch, capsys):
    bench = load("train_mfu")
    monkeypatch.setattr(sys, "argv", ["train_mfu.py", "--steps", "3", "--warmup", "1", "--peak-seconds", "0.05"])
    bench.main()
    out = capsys.readouterr().out
    mfu = float(out.split("MFU vs model-shape peak")[1].split("%")[0])
    assert 0 < mfu < 100
    assert "padding (share of computed token positions)" in out and "data engine" in out
    assert "forward: decoder" in out and "backward" in out


def test_decode_speed_runs_and_cached_tokens_match(monkeypatch, capsys):
    bench = load("decode_speed")
    monkeypatch.setattr(sys, "argv", ["decode_speed.py", "--batches", "2", "--image-sizes", "64"])
    bench.main()
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "64" and row[1] == "2" and row[6] == "True"  # both caches draw the recomputed tokens


def test_experiment_workers_times_a_shortened_matrix(monkeypatch, capsys):
    """One real cell, shortened to 2 steps and 2 scored watches, through the experiment runner."""
    bench = load("experiment_workers")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["experiment_workers.py", "--only", "architecture=siglip_vq,regime=mixed,seed=0",
                                      "--steps", "2", "--test-watches", "2", "--workers", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "1 cell(s) of tiny_learned_mixed_vs_specific.yaml" in out and "| 1 | " in out and out.rstrip().endswith("| 1.00 |")


BAD_INPUT = [
    (["--config", "configs/nope.yaml"], "--config configs/nope.yaml: cannot read it"),
    (["--config", "configs/experiments/tiny_transfer.yaml"],
     "--config configs/experiments/tiny_transfer.yaml: no model or data section; give a training config"),
]
BAD_PRECISION = (["--precision", "16-fancy"], "--precision 16-fancy: the CPU benchmarks run one of")
BAD_MATRIX = [
    (["--experiment", "configs/nope.yaml"], "--experiment configs/nope.yaml: no such file"),
    (["--only", "seed=9"], "--experiment configs/experiments/tiny_learned_mixed_vs_specific.yaml: --only 'seed=9' matches no cell"),
    (["--workers", "1", "99"], "--workers [1, 99]: each must be between 1 and the"),
]


@pytest.mark.parametrize("name, argv, message", [
    *[(name, argv, message) for name in ("train_speed", "train_mfu", "decode_speed") for argv, message in BAD_INPUT],
    *[(name, *BAD_PRECISION) for name in ("train_speed", "train_mfu")],  # decode_speed runs the CPU's auto precision
    *[("experiment_workers", argv, message) for argv, message in BAD_MATRIX],
])
def test_benchmarks_refuse_bad_input_with_a_message(name, argv, message, monkeypatch, capsys):
    """A config that is missing or not a training config, or a precision the CPU cannot run: exit 2 and
    a line that says what to change, before anything is built or timed."""
    from unified_vlm.benchmarking import run

    bench = load(name)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [name] + argv)
    with pytest.raises(SystemExit) as stopped:
        run(bench.main)
    assert stopped.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_a_config_that_does_not_build_names_its_file(tmp_path):
    import yaml

    from unified_vlm.benchmarking import BenchmarkError, build, read_config

    config = yaml.safe_load((ROOT / "configs" / "tiny_siglip_vq.yaml").read_text())
    config["model"]["colour"] = "red"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(BenchmarkError, match=f"--config {path}: the model or data does not build: .*colour"):
        build(read_config(path), path)
