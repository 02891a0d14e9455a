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


def test_readme_options_exist():
    accepted = {
        "data": set(inspect.signature(UnifiedDataModule.__init__).parameters),
        "model": set(inspect.signature(UnifiedVLM.__init__).parameters),
        "trainer": set(inspect.signature(L.Trainer.__init__).parameters),
    }
    for group, name in re.findall(r"--(data|model|trainer)\.(\w+)", README):
        assert name in accepted[group], f"--{group}.{name}"
