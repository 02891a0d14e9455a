"""The README stays true to the code: its commands, configs and options exist, and its map lists every module.

The commands and options of docs/studies.md (the measurements moved out of the README) are checked too."""
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
STUDIES = (ROOT / "docs" / "studies.md").read_text()


def test_readme_has_install_main_and_test_commands():
    assert 'pip install -e ".[test]"' in README
    assert "python -m unified_vlm fit --config configs/tiny_siglip_vq.yaml" in README
    assert "python -m pytest -q" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "python -m pytest -q" in ci


def test_readme_commands_and_configs_exist():
    commands = re.findall(r"python -m unified_vlm ([a-z][a-z-]*)", README + STUDIES)
    assert commands and set(commands) <= set(LIGHTNING) | set(TOOLS)
    for path in re.findall(r"(configs/[\w./-]+\.yaml)", README + STUDIES):
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
    named = re.findall(r"--(\w+)\.([\w.]*\w)", README + STUDIES)
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


def listed_files(block: str) -> set[str]:
    """The files a map lists, as paths from the repository root: a line starting ``name/`` opens a
    folder for the lines indented below it; a line starting ``name.py`` is a file in that folder."""
    paths, folders = set(), []  # folders: (indent, "name/") of the open folders, outermost first
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        while folders and folders[-1][0] >= indent:
            folders.pop()
        if name.endswith("/"):
            folders.append((indent, name))
        elif name.endswith(".py"):
            paths.add("".join(folder for _, folder in folders) + name)
    return paths


def readme_map() -> set[str]:
    section = README.split("## What is inside", 1)[1]
    return listed_files(section.split("```", 2)[1])


def modules() -> set[str]:
    """Every module of the package (``__init__.py`` aside) and every benchmark script."""
    found = {p for p in (ROOT / "unified_vlm").rglob("*.py") if p.name != "__init__.py"}
    found |= set((ROOT / "benchmarks").glob("*.py"))
    return {p.relative_to(ROOT).as_posix() for p in found}


def test_readme_map_lists_every_module():
    missing = sorted(modules() - readme_map())
    assert not missing, f"add these to the README's 'What is inside' map, one line each under their folder: {missing}"


def test_readme_map_lists_only_files_that_exist():
    stale = sorted(path for path in readme_map() if not (ROOT / path).is_file())
    assert not stale, f"the README's 'What is inside' map lists files that do not exist: {stale}"


def test_map_parser_follows_the_indentation():
    block = """
pkg/
  top.py      a module
  sub/        a folder
    reader.py   in sub
  other/
    reader.py   the same name, another folder
  last.py
bench/
  run.py
docs/         prose with reader.py inside is not a file
"""
    assert listed_files(block) == {"pkg/top.py", "pkg/sub/reader.py", "pkg/other/reader.py", "pkg/last.py", "bench/run.py"}
