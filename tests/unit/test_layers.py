"""The tree shows the architecture: a module imports only from its own layer and lower ones
(core -> data -> model -> plan/objectives/regularizers/plugin config -> executors -> commands)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "localopt_plugin"
# top-level module or package of localopt_plugin -> its layer
LAYERS = {
    "registry": 0, "platform": 0, "errors": 0, "metric_names": 0, "config_flags": 0,
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


def test_deepspeeds_pipeline_is_imported_by_its_executor_only():
    """DeepSpeed's pipeline module is an executor's business: the model layer builds GPTModels
    (each pipeline stage is one), ``training/pipeline.py`` assembles them for DeepSpeed."""
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n.startswith(("deepspeed.pipe", "deepspeed.runtime.pipe")) for n in names):
                importers.append("/".join(path.relative_to(PACKAGE).parts))
    assert set(importers) <= {"training/pipeline.py", "training/steps.py"}, importers


def _registered() -> dict[str, set[str]]:
    """Every ``@register(kind, name)`` in the package's source, by kind."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register"
                    and len(node.args) == 2
                    and all(isinstance(a, ast.Constant) for a in node.args)):
                found.setdefault(node.args[0].value, set()).add(node.args[1].value)
    return found


def test_built_in_components_register_through_imports_the_layer_test_sees():
    """The registry names no module of the package (a string import would hide an upward
    dependency from the test above): each kind's built-ins register when the modules that look
    the kind up are imported: the plugin config for the run's components, ``tokenizers`` for
    tokenizers. Checked in a fresh interpreter against every ``@register`` in the source."""
    tree = ast.parse((PACKAGE / "registry.py").read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr)}
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and id(n) not in docstrings
             and n.value.startswith("localopt_plugin.")}
    assert named == {"localopt_plugin.components"}, named  # the entry-point group only
    code = ("import json; from localopt_plugin import plugin, tokenizers, registry; "
            "print(json.dumps({k: registry.names(k) for k in registry.KINDS}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    names = {kind: set(found) for kind, found in json.loads(out.splitlines()[-1]).items()}
    expected = _registered()
    assert set(expected) == set(names) and all(expected[k] <= names[k] for k in expected), (
        expected, names)
