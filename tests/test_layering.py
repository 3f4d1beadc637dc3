"""The direction of imports is the architecture (DESIGN.md): kernels <- common <- models <- tasks ->
training, main.py on top. Every module's imports are read with `ast` (no module is executed), and
an import against the direction fails here with the file and line."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"jamba_jax", "sensebert_jax", "aux_tuning", "active_learning"}
PROJECT = {"kernels", "common", "training", "tasks", "configs", "data", "benchmarks", "main"} | MODELS
# what each package may import from the project (third-party imports are free)
ALLOWED = {
    "kernels": {"kernels"},
    "common": {"kernels", "common"},
    "jamba_jax": {"kernels", "common", "jamba_jax"},
    "sensebert_jax": {"kernels", "common", "sensebert_jax"},
    "aux_tuning": {"kernels", "common", "aux_tuning", "jamba_jax"},  # wraps a Jamba as its frozen LM
    "active_learning": {"kernels", "common", "active_learning"},
    "training": {"kernels", "common", "training"},
    "tasks": {"kernels", "common", "training", "tasks"} | MODELS,
    "configs": {"configs"},
}


def project_imports(path: str):
    """(line, top-level project package) for every import in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PROJECT:
                yield node.lineno, top


def modules_of(package: str):
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layering(package):
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports {top}"
           for path in modules_of(package) for line, top in project_imports(path) if top not in ALLOWED[package]]
    assert not bad, "imports against kernels <- common <- models <- tasks -> training:\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom training.data import DataError\nimport jamba_jax.layers\n")
    assert [top for _, top in project_imports(str(bad))] == ["training", "jamba_jax"]
    assert "training" not in ALLOWED["jamba_jax"] and "jamba_jax" not in ALLOWED["sensebert_jax"]


def test_every_package_is_covered():
    packages = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
    assert packages - {"tests", "benchmarks", "data"} <= set(ALLOWED), packages - set(ALLOWED)
