"""The package's layout rules (README "What is inside"): no import loop, and each package imports
only the packages below it. Every import statement counts, also those inside functions, since a
lazy import is still a dependency."""
import ast
from pathlib import Path

import unified_vlm

ROOT = Path(unified_vlm.__file__).resolve().parent

# What each package may not import (directly). models/ holds parts; the jobs that train parts
# import them, never the other way round; evaluation/ is usable without the training machinery.
# The model and the data meet only in the chat format, a ground-floor module both import.
FORBIDDEN = {
    "unified_vlm.datamodules": ("unified_vlm.models", "unified_vlm.pretraining", "unified_vlm.evaluation",
                                "unified_vlm.callbacks", "unified_vlm.experiments", "unified_vlm.cli",
                                "unified_vlm.lightning_cli"),
    "unified_vlm.models": ("unified_vlm.datamodules", "unified_vlm.pretraining", "unified_vlm.evaluation",
                           "unified_vlm.callbacks", "unified_vlm.experiments", "unified_vlm.cli",
                           "unified_vlm.lightning_cli"),
    "unified_vlm.evaluation": ("unified_vlm.pretraining", "unified_vlm.callbacks", "unified_vlm.experiments",
                               "unified_vlm.cli", "unified_vlm.lightning_cli"),
    "unified_vlm.pretraining": ("unified_vlm.callbacks", "unified_vlm.experiments", "unified_vlm.cli",
                                "unified_vlm.lightning_cli"),
    "unified_vlm.callbacks": ("unified_vlm.pretraining", "unified_vlm.experiments", "unified_vlm.cli"),
    "unified_vlm.chat_format": ("unified_vlm.models", "unified_vlm.datamodules", "unified_vlm.pretraining",
                                "unified_vlm.evaluation", "unified_vlm.callbacks", "unified_vlm.experiments",
                                "unified_vlm.cli", "unified_vlm.lightning_cli"),
    "unified_vlm.assets": ("unified_vlm.",),  # a leaf: every part may look built-in weights up
    "unified_vlm.files": ("unified_vlm.",),
    "unified_vlm.datamodules.watch": ("unified_vlm.",),  # the watch renderer, a leaf (see ALLOWED)
}
# Imports a rule above would forbid but that are allowed, with the reason.
ALLOWED = {
    # The retrieval renderer indexes, and a feature decoder checks its encoder on, rendered watches:
    # watch.py draws them and imports nothing of the package.
    ("unified_vlm.models.feature_decoder", "unified_vlm.datamodules.watch"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when
    that is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, known) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_packages_import_only_downwards():
    graph = import_graph()
    violations = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for package, forbidden in FORBIDDEN.items()
        if module == package or module.startswith(package + ".")
        for target in targets
        if (module, target) not in ALLOWED
        and any(target == f or target.startswith(f if f.endswith(".") else f + ".") or target == f.rstrip(".")
                for f in forbidden)
    ]
    assert not violations, "\n".join(violations)


def test_every_allowed_exception_is_still_needed():
    graph = import_graph()
    assert all(target in graph[module] for module, target in ALLOWED), "drop the ALLOWED entries nothing needs"


def test_the_checker_sees_lazy_imports_and_cycles():
    """The graph records function-level imports, and a loop is found (so an empty result means something)."""
    graph = import_graph()
    assert "unified_vlm.pretraining.build_assets" in graph["unified_vlm.lightning_cli"]  # imported inside a method
    assert "unified_vlm.models.builders" in graph["unified_vlm.models.unified"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_two_modules_share_a_file_name():
    """A traceback or a search names a file by its name: each module's name is its own."""
    names: dict[str, list[str]] = {}
    for path in ROOT.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(module_name(path))
    assert {name: mods for name, mods in names.items() if len(mods) > 1} == {}
