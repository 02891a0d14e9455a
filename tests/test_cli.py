"""The CLI end to end on a tiny config: fit a few steps, then reload the checkpoint for test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unified_vlm.cli import main

CONFIG_DIR = Path(__file__).resolve().parents[1].joinpath("configs")
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
TINY_CONFIGS = [c for c in CONFIGS if c.stem.startswith("tiny_")]
PAPER_CONFIGS = [c for c in CONFIGS if c.stem.startswith("paper_")]
MAIN_CONFIG = CONFIG_DIR / "tiny_siglip_vq.yaml"
TINY_SIGLIP = {"name": "siglip", "weights": None,
               "options": {"image_size": 16, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                           "intermediate_size": 64}}


def tiny_overrides(tmp_path: Path, vq_dir: str, config: Path = MAIN_CONFIG) -> Path:
    """Shrinks a shipped config to a model that trains a step in well under a second, keeping
    its combination: VQ-code inputs stay VQ codes, feature outputs stay features."""
    model = yaml.safe_load(config.read_text())["model"]
    vq_input = model["encoder"]["name"] == "vq_codes"
    encoder = {"name": "vq_codes", "weights": vq_dir, "options": {}} if vq_input else TINY_SIGLIP
    if model["image_output"]["space"] == "features":
        same = model["image_output"].get("encoder") is None
        image_output = {"tokenizer": None, "renderer": "retrieval:4", "encoder": None if same else TINY_SIGLIP}
    else:
        image_output = {"tokenizer": vq_dir}
    override = {
        "model": {
            "encoder": encoder,
            "backbone": {"name": "qwen2", "options": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
            "image_output": image_output,
            "sampling": {"max_new_tokens": 4},
        },
        "data": {"image_size": 16, "num_train_watches": 8, "num_val_watches": 2, "num_test_watches": 3, "global_batch_size": 4,
                 "num_workers": 0, "eval_batch_size": 8, "curriculum": {"steps": 1}},
        "trainer": {
            "max_steps": 3, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": ""}},
            "enable_progress_bar": False,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "data", "list", "pretrain-encoder", "train-vq"):
        assert command in out


def test_list_prints_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("siglip", "qwen2", "llama", "mlp", "linear", "vq_classification", "vq"):
        assert name in out


def test_unknown_command_suggests(capsys):
    assert main(["fitt"]) == 2
    assert "fit" in capsys.readouterr().err


def test_the_four_combinations_ship_in_both_sizes():
    combos = {"siglip_siglip", "siglip_vq", "vq_siglip", "vq_vq"}
    assert {c.stem.removeprefix("tiny_") for c in TINY_CONFIGS} == combos
    assert {c.stem.removeprefix("paper_") for c in PAPER_CONFIGS} == combos


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=[c.stem for c in TINY_CONFIGS])
def test_fit_then_test_from_checkpoint(config, tmp_path, tiny_vq_dir, capsys):
    tiny = tiny_overrides(tmp_path, tiny_vq_dir, config)
    main(["fit", "--config", str(config), "--config", str(tiny)])
    run = tmp_path / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    scores = json.loads((run / "test_scores.json").read_text())
    assert scores["summary"]["all_turns"]["count"] > 0
    assert (run / "generation_grid.png").is_file()
    generation = scores["generation"]  # both directions are measured
    assert generation["requested"] == 3 and generation["renderer"]
    if generation["generated"] >= 2:
        assert 0 <= generation["faithfulness"]["total"] <= 1 and generation["faithfulness"]["count"] == generation["generated"]
        assert generation["frechet"]["low"] <= generation["frechet"]["fd"] <= generation["frechet"]["high"]
        assert generation["frechet"]["n_real"] == 1000
    assert scores["captions"]["total"]["count"] == 3
    gain = generation["prompt_gain"]  # teacher-forced: measured whether or not the images came out
    assert {"prompt_gain", "prompt_gain/time"} <= set(gain) and all(abs(v) < 50 for v in gain.values())
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/vqa/total", "val/vqa/weather"} <= set(header)  # the VQA probe scored the validation split
    out = capsys.readouterr().out
    assert "VQA scores on the test split" in out

    # Reload the checkpoint through the CLI with the run's own saved config.
    (run / "test_scores.json").unlink()
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path / "retest")])
    rescored = json.loads((tmp_path / "retest" / "test_scores.json").read_text())
    assert rescored["summary"] == scores["summary"]  # greedy decoding of the same weights


def test_evaluate_scores_every_checkpoint_of_a_run(tmp_path, tiny_vq_dir, capsys):
    tiny = tiny_overrides(tmp_path, tiny_vq_dir)
    main(["fit", "--config", str(MAIN_CONFIG), "--config", str(tiny), "--test_after_fit", "false",
          "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1",
          "--generation_probe.max_images", "2", "--generation_probe.fd_reference", "8"])
    run = tmp_path / "version_0"
    assert {"val/gen/total", "val/gen/fd"} <= set((run / "metrics.csv").read_text().splitlines()[0].split(","))
    assert list((run / "probe").glob("generation_step*.png"))  # the probe's grid of the validation prompts
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) >= 2 and "last.ckpt" in checkpoints
    assert main(["evaluate", str(run), "--report.fd_reference", "16", "--report.bootstrap", "5"]) == 0
    rows = json.loads((run / "evaluation.json").read_text())
    assert [r["checkpoint"] for r in rows][-1] == "last.ckpt" and len(rows) == len(checkpoints)
    assert all(isinstance(r["all_turns/total"], float) and isinstance(r["captions/total/stated"], float) for r in rows)
    assert rows[-1]["step"] == 3
    assert (run / "evaluation.csv").read_text().startswith("checkpoint,step,")
    stamp = (run / "evaluation" / "last" / "test_scores.json").stat().st_mtime
    assert main(["evaluate", str(run), "--checkpoints", "last"]) == 0  # scored already: not tested again
    assert (run / "evaluation" / "last" / "test_scores.json").stat().st_mtime == stamp


def test_evaluate_refuses_what_it_cannot_score(tmp_path, capsys):
    empty = tmp_path / "run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text("model: {}\n")
    with pytest.raises(SystemExit):
        main(["evaluate", str(empty)])
    assert "has no checkpoint" in capsys.readouterr().err
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    records = tmp_path / "vqa_only.jsonl"
    records.write_text(json.dumps({"id": "a", "task": "vqa", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat time is it?"}, {"from": "gpt", "value": "10:08:30"}]}) + "\n")
    (empty / "checkpoints" / "last.ckpt").write_text("not used")
    with pytest.raises(SystemExit):
        main(["evaluate", str(empty), "--test-records", str(records)])
    assert "no generation records" in capsys.readouterr().err
    # an image outside the records' folder: refused, naming the option that trusts the file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "vqa_outside.jsonl"
    outside.write_text(records.read_text().replace('"a.png"', json.dumps(str(tmp_path / "a.png"))))
    with pytest.raises(SystemExit):
        main(["evaluate", str(empty), "--test-records", str(outside)])
    assert "--allow-images-outside-root" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # trusted: the path passes, the next check speaks
        main(["evaluate", str(empty), "--test-records", str(outside), "--allow-images-outside-root"])
    assert "no generation records" in capsys.readouterr().err


def test_vqa_probe_rejects_a_negative_record_count():
    from unified_vlm.callbacks import VQAProbe

    with pytest.raises(ValueError, match="max_records"):
        VQAProbe(max_records=-1)


def test_unknown_config_key_is_rejected(tmp_path, tiny_vq_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoderr: {name: siglip}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(MAIN_CONFIG), "--config", str(bad)])


def test_predict_writes_images_from_a_prompts_file(tmp_path, tiny_vq_dir):
    tiny = tiny_overrides(tmp_path, tiny_vq_dir)
    main(["fit", "--config", str(MAIN_CONFIG), "--config", str(tiny), "--test_after_fit", "false"])
    run = tmp_path / "version_0"
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # the run keeps its tokenizer
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two watches\nDraw a smart watch showing 10:08:30.\n\nPlease show a smart watch, with 80% battery.\n")
    out = tmp_path / "pred"
    main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--data.predict_prompts", str(prompts), "--predictions.output_dir", str(out), "--trainer.logger", "false"])
    entries = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [e["prompt"] for e in entries] == ["Draw a smart watch showing 10:08:30.", "Please show a smart watch, with 80% battery."]
    for entry in entries:
        assert (out / entry["file"]).is_file() and entry["sampling"]["seed"] == 0


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=[c.stem for c in PAPER_CONFIGS])
def test_paper_configs_parse_against_the_typed_specs(config):
    """Paper configs need local 7B weights, so they are parsed (every key checked against the
    model's typed signature and the data module's), not instantiated; the paper's numbers are pinned."""
    from jsonargparse import ArgumentParser

    from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
    from unified_vlm.models.unified import UnifiedVLM

    raw = yaml.safe_load(config.read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(UnifiedVLM, "model")
    parser.add_class_arguments(UnifiedDataModule, "data", skip={"collator"})
    parsed = parser.parse_object({"model": raw["model"], "data": raw["data"]})
    model, data, trainer = parsed.model, parsed.data, raw["trainer"]
    assert model.backbone.train == "lora" and model.backbone.lora == {"r": 128, "alpha": 256, "dropout": 0.05, "target_modules": "all-linear"}
    assert model.backbone.gradient_checkpointing and model.encoder.freeze
    assert (model.optim.lr, model.optim.projector_lr, model.optim.warmup_ratio) == (2e-4, 1e-4, 0.03)
    assert data.global_batch_size == 393 and data.global_batch_size % trainer["devices"] == 0
    assert trainer["max_epochs"] == 1 and trainer["precision"] == "auto"
    expected_alpha = 0.2 if model.image_output.space == "vq" else 1.0
    assert model.image_output.loss_weight == expected_alpha


# What may differ between the four tiny configs: where they write, and the architecture of the
# combination (its encoder, understanding projector and output side). Everything else is the shared
# recipe (trainer, data, curriculum, backbone, optimiser, sampling) and must agree.
ARCHITECTURE_KEYS = {
    "trainer.default_root_dir", "trainer.logger.init_args.save_dir",
    "model.encoder.name", "model.encoder.options", "model.und_projector",
    "model.image_output.space", "model.image_output.tokenizer", "model.image_output.encoder", "model.image_output.renderer",
    "model.image_output.head", "model.image_output.loss_weight", "model.image_output.projector",
}


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ARCHITECTURE_KEYS:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def test_the_tiny_configs_share_one_recipe():
    main = flatten(yaml.safe_load(MAIN_CONFIG.read_text()))
    for config in TINY_CONFIGS:
        other = flatten(yaml.safe_load(config.read_text()))
        differing = sorted(k for k in set(main) | set(other) if main.get(k, "<absent>") != other.get(k, "<absent>"))
        assert set(differing) <= ARCHITECTURE_KEYS, f"{config.name} departs from the shared recipe at {set(differing) - ARCHITECTURE_KEYS}"


def test_validation_counts_optimiser_steps_across_data_epochs(tmp_path, tiny_vq_dir):
    """``val_check_interval`` in the tiny configs counts optimiser steps over the whole run: a run
    whose data epoch (3 steps here) is shorter than the interval still validates every 4 steps,
    where Lightning's default (``check_val_every_n_epoch: 1``) would restart the count each epoch."""
    tiny = tiny_overrides(tmp_path, tiny_vq_dir)
    main(["fit", "--config", str(MAIN_CONFIG), "--config", str(tiny), "--data.num_train_watches", "4",
          "--data.proportions", "null", "--data.curriculum", "null", "--trainer.max_steps", "9",
          "--trainer.val_check_interval", "4", "--test_after_fit", "false"])
    import csv

    rows = list(csv.DictReader((tmp_path / "version_0" / "metrics.csv").open()))
    validated = sorted({int(r["step"]) for r in rows if r.get("val/vqa/total")})
    epochs = {int(r["epoch"]) for r in rows}
    assert validated == [3, 7] and len(epochs) >= 3, (validated, epochs)
