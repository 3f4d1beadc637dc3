"""Tasks by convention: `config.task = "x"` runs `tasks/x.py`, which exports either

  Task                 a class built from the config and trained on the shared loop
                       (`training.train.run`; the contract is `training.task.Task`), or
  run(config, workdir) a driver of its own (generation, an active-learning experiment).

Adding a task adds a module here and edits no registry.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil

from common.errors import UserError

_HERE = os.path.dirname(os.path.abspath(__file__))


class UnknownTaskError(UserError):
    pass


def _exports(module_name: str) -> set[str]:
    """Top-level names among Task / run that a task module defines (read from its source, so listing
    the tasks imports none of them)."""
    with open(os.path.join(_HERE, f"{module_name}.py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names & {"Task", "run"}


def available() -> list[str]:
    """The task names: modules of this package that export Task or run."""
    return sorted(m.name for m in pkgutil.iter_modules([_HERE]) if not m.ispkg and _exports(m.name))


def run(config, workdir: str):
    """Runs the task `config.task` names with (config, workdir)."""
    name = config.get("task", None) if hasattr(config, "get") else getattr(config, "task", None)
    if not name:
        raise UnknownTaskError(f"config has no `task` field; the tasks are {available()}")
    if name not in available():
        raise UnknownTaskError(f"unknown task {name!r}: no tasks/{name}.py exporting Task or run; "
                               f"the tasks are {available()}")
    module = importlib.import_module(f"tasks.{name}")
    if hasattr(module, "Task"):
        from training import train

        return train.run(module.Task(config), config, workdir)
    return module.run(config, workdir)
