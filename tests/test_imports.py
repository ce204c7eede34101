"""The package's import structure: no cycles, and a CLI that starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "shpeft"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, package: str, modules: set[str], deps: set[str]) -> None:
    """Add the package modules ``node`` (and its children) imports to ``deps``."""
    if isinstance(node, ast.If) and _is_type_checking(node):
        for child in node.orelse:
            _imports(child, package, modules, deps)
        return
    if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target in modules:
            deps.add(target)
        deps.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules)
    for child in ast.iter_child_nodes(node):
        _imports(child, package, modules, deps)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, function-level imports included and
    ``if TYPE_CHECKING:`` blocks (annotations only) excluded; ``from pkg import sub`` counts as
    importing ``pkg.sub`` when that is a module."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        _imports(ast.parse(path.read_text()), package, set(paths), deps)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            # a module importing its own package's __init__ (e.g. `from shpeft import x`) is
            # the package being loaded first, not a cycle between modules
            if n.startswith(m + "."):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := dfs(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "code",
    [
        "import shpeft.cli as c; c.build_parser()",
        "import shpeft, shpeft.methods as m; m.METHODS['shpeft'].config_cls(); shpeft.RunConfig",
        "from shpeft.config import BackboneConfig, DataConfig, TrainConfig, RunConfig",
    ],
)
def test_configs_parser_and_registry_load_without_torch(code):
    probe = (
        f"import sys; {code}; "
        "heavy = [m for m in ('torch', 'timm', 'peft', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_peft_is_imported_only_by_the_methods_that_use_it():
    users = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "peft" or n.startswith("peft.") for n in names):
                users.add(_module_name(path))
    assert users <= {"shpeft.methods.lora", "shpeft.methods.spt_lora"}, users
