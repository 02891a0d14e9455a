"""The README stays true to the code: its commands, configs and options exist."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import lightning as L

from unified_vlm.cli import LIGHTNING, TOOLS
from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
from unified_vlm.models.unified import UnifiedVLM

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_has_install_main_and_test_commands():
    assert 'pip install -e ".[test]"' in README
    assert "python -m unified_vlm fit --config configs/tiny_siglip_vq.yaml" in README
    assert "python -m pytest -q" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "python -m pytest -q" in ci


def test_readme_commands_and_configs_exist():
    commands = re.findall(r"python -m unified_vlm ([a-z][a-z-]*)", README)
    assert commands and set(commands) <= set(LIGHTNING) | set(TOOLS)
    for path in re.findall(r"(configs/[\w./-]+\.yaml)", README):
        assert (ROOT / path).is_file(), path


def accepted_options() -> dict[str, set[str]]:
    """Every ``--group.option`` group the CLI has, with the options it takes."""
    from unified_vlm.callbacks import (
        EvaluationReport,
        GenerationProbe,
        NonFiniteLossGuard,
        PredictionWriter,
        RunCheckpoint,
        VQAProbe,
    )

    def params(fn) -> set[str]:
        return set(inspect.signature(fn).parameters) - {"self", "args", "kwargs"}

    return {
        "data": params(UnifiedDataModule.__init__),
        "model": params(UnifiedVLM.__init__),
        "trainer": params(L.Trainer.__init__),
        "report": params(EvaluationReport.__init__),
        "predictions": params(PredictionWriter.__init__),
        "vqa_probe": params(VQAProbe.__init__),
        "generation_probe": params(GenerationProbe.__init__),
        "checkpoint": params(RunCheckpoint.__init__),
        "nonfinite": params(NonFiniteLossGuard.__init__),
    }


def test_readme_options_exist():
    from dataclasses import fields

    from unified_vlm.models import config

    specs = {"encoder": config.EncoderSpec, "backbone": config.BackboneSpec, "image_output": config.ImageOutputSpec,
             "optim": config.OptimSpec, "sampling": config.SamplingSpec}
    accepted = accepted_options()
    named = re.findall(r"--(\w+)\.([\w.]*\w)", README)
    assert {"vqa_probe", "predictions"} <= {group for group, _ in named}
    for group, option in named:
        if (group, option) == ("group", "option"):  # the placeholder in the cookbook's first line
            continue
        assert group in accepted, f"--{group}.{option}: no option group {group!r}"
        name, *rest = option.split(".")
        assert name in accepted[group], f"--{group}.{option}"
        if group == "model" and rest:
            assert rest[0] in {f.name for f in fields(specs[name])}, f"--{group}.{option}"


def test_readme_option_check_catches_a_wrong_group_and_a_wrong_option():
    accepted = accepted_options()
    assert "max_records" in accepted["vqa_probe"] and "output_dir" in accepted["predictions"]
    assert "max_record" not in accepted["vqa_probe"] and "prediction" not in accepted
