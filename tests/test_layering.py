"""The direction of imports is the architecture (DESIGN.md): kernels <- common <- models <- tasks ->
training, main.py on top; every task module is a leaf. And the size limits that keep modules readable:
no file over 400 lines, no function over 60 lines outside kernels/, no import of another module's private
name. Every module is read with `ast` (nothing is executed); a violation fails with the file and line."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"jamba_jax", "sensebert_jax", "aux_tuning", "active_learning", "serving"}
PROJECT = {"kernels", "common", "training", "tasks", "configs", "data", "benchmarks", "main"} | MODELS
# what each package may import from the project (third-party imports are free)
ALLOWED = {
    "kernels": {"kernels"},
    "common": {"kernels", "common"},
    "jamba_jax": {"kernels", "common", "jamba_jax"},
    "sensebert_jax": {"kernels", "common", "sensebert_jax"},
    "aux_tuning": {"kernels", "common", "aux_tuning", "jamba_jax"},  # wraps a Jamba as its frozen LM
    "active_learning": {"kernels", "common", "active_learning"},
    "serving": {"kernels", "common", "jamba_jax", "serving"},  # the engine and server over a Jamba
    "training": {"kernels", "common", "training"},
    "tasks": {"kernels", "common", "training", "tasks"} | MODELS,
    "configs": {"configs"},
}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def parse(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read(), path)


def imports(tree: ast.Module):
    """(line, module name, names imported from it or None) for every absolute import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]


def project_imports(path: str):
    """(line, top-level project package) for every import in the file."""
    for line, module, _ in imports(parse(path)):
        top = module.split(".")[0]
        if top in PROJECT:
            yield line, top


def modules_of(*packages: str):
    for package in packages:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def every_module():
    return list(modules_of(*sorted(PROJECT - {"main"}), "tests")) + [os.path.join(ROOT, "main.py")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layering(package):
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports {top}"
           for path in modules_of(package) for line, top in project_imports(path) if top not in ALLOWED[package]]
    assert not bad, "imports against kernels <- common <- models <- tasks -> training:\n" + "\n".join(bad)


def test_task_modules_are_leaves():
    """A task module imports no other module of tasks/ (what two tasks share lives below them)."""
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports {module}"
           for path in modules_of("tasks") for line, module, _ in imports(parse(path))
           if module == "tasks" or module.startswith("tasks.")]
    assert not bad, "\n".join(bad)


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for path in every_module():
        rel = os.path.relpath(path, ROOT)
        tree = parse(path)
        lines = len(open(path).read().splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append(f"{rel}: {lines} lines")
        if rel.startswith("kernels"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports {name} from {module}"
           for path in every_module() for line, module, names in imports(parse(path)) if names
           for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_checks_see_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom training.data import _private\nimport jamba_jax.layers\nimport tasks.jamba_lm\n")
    assert [top for _, top in project_imports(str(bad))] == ["training", "jamba_jax", "tasks"]
    assert [names for _, _, names in imports(parse(str(bad)))][1] == ["_private"]
    assert "training" not in ALLOWED["jamba_jax"] and "jamba_jax" not in ALLOWED["sensebert_jax"]


def test_every_package_is_covered():
    packages = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
    assert packages - {"tests", "benchmarks", "data"} <= set(ALLOWED), packages - set(ALLOWED)
