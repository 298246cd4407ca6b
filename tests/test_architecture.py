"""The layout rules a contributor can break without any behaviour test noticing: no import circle inside
``accel``, plugins that import only the plugin contract, no private ``accel`` names used outside the package, and
accelerator files that stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "accel"
# what an accelerator may import from accel: the plugin contract, the kernels, family knowledge, registration
PLUGIN_IMPORTS = ("accel.hooks", "accel.steps", "accel.config", "accel.attention", "accel.kernels",
                  "accel.pipelines.adapters", "accel.registry", "accel.io", "accel.methods")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, name: str | None = None) -> set[str]:
    """Every accel module ``path`` imports, at module level, inside functions or under ``TYPE_CHECKING``.

    ``from package import name`` counts as importing the submodule ``package.name`` when there is one, else the
    package itself; the parent packages Python runs on the way are not counted (they are not a choice of the file).
    """
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module == "accel" or module.startswith("accel.")}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports), as a path back to its start, or ``None``."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state and (circle := visit(target, [*trail, target])):
                return circle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module, [module])):
            return circle
    return None


def test_no_import_circle_in_accel():
    circle = find_circle({name: imports(path) & set(MODULES) for name, path in MODULES.items()})
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_check_sees_lazy_imports(tmp_path):
    # the test above must be able to fail: a function-level import of api from hooks closes a circle
    lazy = tmp_path / "hooks.py"
    lazy.write_text("def f():\n    from . import api\n")
    graph = {name: imports(path) & set(MODULES) for name, path in MODULES.items()}
    graph["accel.hooks"] = imports(lazy, "accel.hooks") & set(MODULES)
    assert "accel.hooks" in graph["accel.api"] and find_circle(graph) is not None


@pytest.mark.parametrize("path", sorted((PACKAGE / "methods").rglob("*.py")), ids=lambda p: module_name(p))
def test_accelerators_import_only_the_plugin_contract(path):
    outside = sorted(module for module in imports(path)
                     if not any(module == allowed or module.startswith(allowed + ".") for allowed in PLUGIN_IMPORTS))
    assert not outside, f"{module_name(path)} imports {outside}; plugins use {', '.join(PLUGIN_IMPORTS)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "methods").rglob("*.py")), ids=lambda p: module_name(p))
def test_accelerator_files_stay_readable(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 500, f"{path.name} has {len(text.splitlines())} lines (at most 500)"
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert docstring, f"{module_name(path)} has no module docstring"
    assert len(docstring.splitlines()) <= 30, f"{module_name(path)}'s docstring is {len(docstring.splitlines())} lines"
    assert "shared/design" not in docstring, "docstrings cite papers, not files outside the repository"


def outside_files() -> list[Path]:
    return sorted(path for folder in ("tests", "benchmarks", "training") for path in (ROOT / folder).rglob("*.py"))


def private_accel_names(path: Path) -> list[str]:
    """``accel._x`` modules or ``_x`` names imported from accel by ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names
                      if alias.name.startswith("accel") and any(p.startswith("_") for p in alias.name.split("."))]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("accel"):
            parts = node.module.split(".")
            if any(part.startswith("_") for part in parts):
                found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
    return found


def test_no_private_accel_name_is_imported_outside_the_package():
    offenders = {str(path.relative_to(ROOT)): names
                 for path in outside_files() if (names := private_accel_names(path))}
    assert not offenders, offenders


def test_the_private_name_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from accel.kernels import _secret\nimport accel._hidden\nfrom accel.methods._x import y\n")
    assert private_accel_names(probe) == ["accel.kernels._secret", "accel._hidden", "accel.methods._x"]
