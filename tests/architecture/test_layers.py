"""The import graph by layer: commands -> studies -> plugins (methods, datasets) -> engine, never upward.

Every import statement in the package counts, including imports inside functions (a lazy import is still an
arrow). Run `python -m pytest tests/architecture -q -s` to print the graph.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"harness": "harness", "methods": "harness.methods", "datasets": "harness.datasets",
           "studies": "harness.studies"}
LAYERS = ("engine", "plugins", "studies", "commands")


def layer(module: str) -> str:
    if module in ("harness.cli", "harness.__main__") or module.startswith("harness.commands"):
        return "commands"
    if module.startswith("harness.studies"):
        return "studies"
    if module.startswith(("harness.methods", "harness.datasets")):
        return "plugins"
    return "engine"


def package_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(module: str, path: Path) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return {name for name in found if name == "harness" or name.startswith("harness.")}


def graph() -> dict[str, set[str]]:
    return {module: imports_of(module, path) for module, path in package_modules().items()}


def upward_imports() -> list[str]:
    bad = []
    for module, targets in graph().items():
        for target in sorted(targets):
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                bad.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    return bad


def test_no_upward_imports():
    assert upward_imports() == []


def test_layers_cover_every_module():
    by_layer = defaultdict(list)
    for module in graph():
        by_layer[layer(module)].append(module)
    print("\n".join(f"{name}: {len(by_layer[name])} modules" for name in LAYERS))
    assert all(by_layer[name] for name in LAYERS)


def test_only_tracking_imports_mlflow_and_only_tuning_imports_optuna():
    for module, path in package_modules().items():
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        if "mlflow" in names:
            assert module == "harness.tracking", module
        if "optuna" in names:
            assert module == "harness.studies.tune", module
