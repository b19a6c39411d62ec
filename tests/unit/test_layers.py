"""The tree shows the architecture: a module imports only from its own layer and lower ones
(core -> data -> model -> plan/objectives/regularizers/plugin config -> executors -> commands)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "localopt_plugin"
# top-level module or package of localopt_plugin -> its layer
LAYERS = {
    "registry": 0, "platform": 0, "errors": 0, "metric_names": 0,
    "pause_point": 0,
    "data": 1, "video": 1, "tokenizers": 1,
    "model": 2,
    "plan": 3, "objectives": 3, "regularizers": 3, "plugin": 3,
    "training": 4, "megatron_lm": 4, "generation": 4, "evaluation": 4, "preprocess": 4,
    "bench": 4,
    "commands": 5,
}


def _imports(path: Path) -> set[str]:
    """Top-level localopt_plugin parts a module imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "localopt_plugin" and len(parts) > 1 and parts[1] in LAYERS:
                found.add(parts[1])
    return found


def test_every_module_belongs_to_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
            and p.name != "__init__.py"}
    assert tops <= set(LAYERS), tops - set(LAYERS)


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        top = relative[0].removesuffix(".py")
        if top == "__init__":
            continue
        for imported in _imports(path):
            if LAYERS[imported] > LAYERS[top]:
                violations.append(f"{'/'.join(relative)} imports localopt_plugin.{imported}")
    assert not violations, "\n".join(violations)
