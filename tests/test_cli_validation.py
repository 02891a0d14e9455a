"""Command-line checks: command-line options reach the model (over a checkpoint's), bad input is refused
naming the file or key, and the precision fits the machine."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import yaml

from test_cli import CONFIG_DIR, MAIN_CONFIG, tiny_overrides
from unified_vlm.cli import main

TINY_SIGLIP_64 = {"name": "siglip", "weights": "builtin", "options": {"feature_select": "pooled+patch", "patch_pool": 2}}


def shrink(tmp_path: Path, vq_dir: str, config: Path = MAIN_CONFIG, **trainer) -> list[str]:
    tiny = tiny_overrides(tmp_path, vq_dir, config)
    raw = yaml.safe_load(tiny.read_text())
    raw["trainer"].update({"max_steps": 2, "val_check_interval": 2, **trainer})
    raw["test_after_fit"] = False
    tiny.write_text(yaml.safe_dump(raw))
    return ["--config", str(config), "--config", str(tiny)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vq_dir) -> Path:
    """A run directory of the main config, shrunk: 2 steps."""
    tmp = tmp_path_factory.mktemp("trained")
    main(["fit", *shrink(tmp, tiny_vq_dir)])
    return tmp / "version_0"


def test_command_line_sampling_wins_over_the_checkpoint(trained, tmp_path):
    out = tmp_path / "guided"
    main(["test", "--config", str(trained / "config.yaml"), "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"),
          "--model.sampling.cfg_scale", "3.0", "--model.sampling.top_k", "5",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(out)])
    sampling = json.loads((out / "generation_grid.json").read_text())["sampling"]
    assert (sampling["cfg_scale"], sampling["top_k"]) == (3.0, 5)


def test_without_a_config_the_checkpoint_model_is_used_with_command_line_sampling(trained, tmp_path):
    out = tmp_path / "bare"
    main(["test", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--model.sampling.top_k", "7",
          "--data.image_size", "16", "--data.num_test_watches", "2", "--data.eval_batch_size", "8", "--data.num_workers", "0",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false"])
    sampling = json.loads((out / "generation_grid.json").read_text())["sampling"]
    assert sampling["top_k"] == 7 and sampling["max_new_tokens"] == 4  # 4: the checkpoint's, not the default 24


def test_a_checkpoint_of_another_architecture_is_refused(trained, tmp_path, tiny_vq_dir):
    other = shrink(tmp_path, tiny_vq_dir, CONFIG_DIR / "tiny_vq_vq.yaml")
    with pytest.raises(ValueError, match=r"different model than the config:\n  model.encoder.name: checkpoint 'siglip', config 'vq_codes'"):
        main(["test", *other, "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--trainer.logger", "false"])


def test_shipped_configs_choose_their_precision_from_the_hardware():
    from unified_vlm.precision import auto_precision

    for config in sorted(CONFIG_DIR.glob("*.yaml")):
        assert yaml.safe_load(config.read_text())["trainer"]["precision"] == "auto", config.name
    assert auto_precision("cpu", flags={"avx2", "avx512f"})[0] == "32-true"
    assert auto_precision("cpu", flags={"avx2", "avx512_bf16"}) == ("bf16-mixed", "the CPU computes bf16 natively (avx512_bf16)")
    assert auto_precision("cpu", flags={"amx_bf16"})[0] == "bf16-mixed"


def test_auto_precision_is_logged_and_an_explicit_one_wins(monkeypatch, caplog):
    import logging

    from unified_vlm import precision
    from unified_vlm.lightning_cli import UnifiedTrainer

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    with caplog.at_level(logging.INFO, logger="unified_vlm.precision"):
        trainer = UnifiedTrainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.precision == "32-true"
    assert "precision auto -> 32-true: the CPU has no native bf16" in caplog.text
    assert UnifiedTrainer(accelerator="cpu", precision="bf16-mixed", logger=False).precision == "bf16-mixed"


def test_a_negative_learning_rate_is_refused(tmp_path, tiny_vq_dir):
    with pytest.raises(ValueError, match=r"model.optim.lr=-0.001 is negative"):
        main(["fit", *shrink(tmp_path, tiny_vq_dir), "--model.optim.lr=-1e-3"])
    from unified_vlm.models.config import OptimSpec

    with pytest.raises(ValueError, match="projector_lr must not be negative"):
        OptimSpec(projector_lr=-1.0)


def test_zero_steps_is_refused(tmp_path, tiny_vq_dir):
    with pytest.raises(ValueError, match="trains nothing"):
        main(["fit", *shrink(tmp_path, tiny_vq_dir), "--trainer.max_steps", "0"])
    assert not (tmp_path / "version_0" / "test_scores.json").exists()


def test_a_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  encoder: {name: siglip\n  x: 1\n")
    assert main(["fit", "--config", str(MAIN_CONFIG), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: invalid YAML" in err and "line 3" in err


def test_a_misspelled_encoder_names_the_unknown_name_and_close_matches():
    from unified_vlm.models.builders import resolve_encoder_weights

    with pytest.raises(KeyError, match=r"unknown encoder 'siglipp'\. Did you mean: siglip"):
        resolve_encoder_weights("siglipp", "builtin")


def test_missing_builtin_assets_are_trained_under_fit(tmp_path, monkeypatch, tiny_vq_dir):
    """The documented fallback: no shipped encoder and VQ tokenizer -> trained (here: tiny) and cached,
    before the model is built (unified_vlm.pretraining.build_assets.prepare_builtin_assets)."""
    import shutil

    import unified_vlm.assets as assets
    from unified_vlm.pretraining import pretrain_encoder as encoder_job
    from unified_vlm.pretraining import train_vq as vq_job

    monkeypatch.setenv("UNIFIED_VLM_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "package_assets"  # only the text tokenizer and the reader are "shipped"
    for kept in ("watch_tokenizer", "watch_reader"):  # the reader scores, it is no model part
        shutil.copytree(assets.shipped(kept), package / kept)
    monkeypatch.setattr(assets, "ASSETS_DIR", package)
    monkeypatch.setitem(assets.BUILTIN_ASSETS, "encoder", dataclasses.replace(assets.BUILTIN_ASSETS["encoder"], minutes=0.001))
    monkeypatch.setattr(vq_job, "train_vq_tokenizer", functools.partial(
        vq_job.train_vq_tokenizer, max_steps=2, num_train=8, num_val=4, batch_size=4, progress_bar=False,
        channels=[8, 16], latent_dim=16, codebook_size=32))
    monkeypatch.setattr(encoder_job, "pretrain", functools.partial(
        encoder_job.pretrain, batch_size=4, val_size=8, progress=False,
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    args = shrink(tmp_path, tiny_vq_dir)
    raw = yaml.safe_load(Path(args[-1]).read_text())
    raw["model"]["encoder"] = TINY_SIGLIP_64
    raw["model"]["image_output"] = {"tokenizer": "builtin"}
    raw["data"]["image_size"] = 64
    Path(args[-1]).write_text(yaml.safe_dump(raw))
    main(["fit", *args])
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert any((tmp_path / "cache").glob("siglip_watch_64*/config.json"))
    assert any((tmp_path / "cache").rglob("*vq*/config.json"))


def test_feature_regression_loss_type_is_selectable():
    from unified_vlm.models.config import ImageOutputSpec, coerce

    spec = coerce(ImageOutputSpec, {"space": "features", "head": "feature_regression", "head_options": {"loss_type": "mse"}})
    assert spec.head_options == {"loss_type": "mse"}


def test_architecture_comparison_ignores_sampling_and_settings_older_checkpoints_lack():
    from unified_vlm.lightning_cli import architecture_differences

    saved = {"encoder": {"name": "siglip", "freeze": True}, "image_output": {"head": "vq_classification", "loss_weight": 0.2},
             "sampling": {"top_k": 64}, "max_length": 512}
    configured = {"encoder": {"name": "siglip", "freeze": False}, "image_output": {"head": "vq_classification", "loss_weight": 1.0,
                  "head_options": {}}, "sampling": {"top_k": 5}, "max_length": 512, "und_token_embedding": True}
    assert architecture_differences(saved, configured) == []
    configured["max_length"] = 256
    assert architecture_differences(saved, configured) == ["model.max_length: checkpoint 512, config 256"]
