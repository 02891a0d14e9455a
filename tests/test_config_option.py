"""``-c`` (the short form of ``--config``), ``--config=F`` and ``--config F`` behave the same: the
config decides the model against a checkpoint, its sampling settings are used, a YAML error names
the file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_cli_validation import shrink

from test_cli import CONFIG_DIR
from unified_vlm.cli import config_paths, main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vq_dir) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    main(["fit", *shrink(tmp, tiny_vq_dir)])
    return tmp / "version_0"


def test_every_form_of_the_option_is_found():
    assert config_paths(["fit", "--config", "a.yaml", "-c", "b.yaml", "--config=c.yaml", "-cd.yaml", "-c=e.yaml",
                         "--conf", "f.yaml", "--model.sampling.top_k", "5"]) == [
        "a.yaml", "b.yaml", "c.yaml", "d.yaml", "e.yaml", "f.yaml"]
    assert config_paths(["test", "--ckpt_path", "x.ckpt", "--data.image_size", "16"]) == []


@pytest.mark.parametrize("form", ["-c", "-c=", "--config="])
def test_a_yaml_error_names_the_file_in_every_form(tmp_path, capsys, form):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  encoder: {name: siglip\n  x: 1\n")
    option = [form, str(bad)] if form == "-c" else [form + str(bad)]
    assert main(["fit", *option]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: invalid YAML" in err and "line 3" in err


def test_a_checkpoint_of_another_architecture_is_refused_with_dash_c(trained, tmp_path, tiny_vq_dir):
    _, main_config, _, tiny = shrink(tmp_path, tiny_vq_dir, CONFIG_DIR / "tiny_vq_vq.yaml")
    with pytest.raises(ValueError, match=r"different model than the config:\n  model.encoder.name: checkpoint 'siglip'"):
        main(["test", "-c", main_config, "-c", tiny, "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"),
              "--trainer.logger", "false"])


def test_the_config_sampling_settings_are_used_with_dash_c(trained, tmp_path):
    config = yaml.safe_load((trained / "config.yaml").read_text())
    config["model"]["sampling"].update({"top_k": 5, "cfg_scale": 3.0})
    guided = tmp_path / "guided.yaml"
    guided.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["test", "-c", str(guided), "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"),
                 "--trainer.logger", "false", "--trainer.default_root_dir", str(out)]) == 0
    sampling = json.loads((out / "generation_grid.json").read_text())["sampling"]
    assert (sampling["top_k"], sampling["cfg_scale"]) == (5, 3.0)
