"""The docs the code cites are in the repository: every "docs/paper.md N.M" names a section of
docs/paper.md, and nothing cites the paper notes or machine notes that live outside it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "venv", "runs", "data", "lightning_logs", "build"}


def text_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if path.suffix in {".py", ".md", ".yaml", ".cfg", ".toml"} and not SKIP & set(parts) and path.is_file():
            files.append(path)
    return files


def paper_sections() -> set[str]:
    """Section numbers of docs/paper.md: "## 5." gives "5", "### 5.2 ..." gives "5.2"."""
    text = (ROOT / "docs" / "paper.md").read_text()
    return {m.group(1) for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M)}


def test_every_cited_paper_section_exists():
    sections = paper_sections()
    assert {"1.1", "4.2", "5.2", "7.15"} <= sections
    missing = []
    for path in text_files():
        for match in re.finditer(r"docs/paper\.md (?:section )?(\d+(?:\.\d+)?)", path.read_text(errors="replace")):
            if match.group(1) not in sections:
                missing.append(f"{path.relative_to(ROOT)}: docs/paper.md {match.group(1)}")
    assert not missing, f"cited sections that docs/paper.md does not have: {missing}"


def test_no_file_cites_notes_outside_the_repository():
    stale = [f"{path.relative_to(ROOT)}:{n}" for path in text_files() if path.name != "test_docs.py"
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if re.search(r"(?<![\w/])(PAPER|MACHINE)\.md", line)]
    assert not stale, f"cite docs/paper.md or docs/machines.md instead: {stale}"
