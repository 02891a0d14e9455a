"""Style holds without review: ``ruff check`` passes over the repository (rules in pyproject.toml)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff_command() -> list[str] | None:
    """The ruff of this environment (the test extra pins it), else one on PATH."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_check_passes():
    command = ruff_command()
    if command is None:
        pytest.skip('ruff is not installed: pip install -e ".[test]" installs the pinned version')
    done = subprocess.run([*command, "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"ruff check found problems (`ruff check --fix` repairs those marked [*]):\n{done.stdout}{done.stderr}",
                    pytrace=False)
