"""Tasks by convention: `config.task = "x"` runs `tasks/x.py`, which exports either

  Task                 a class built from the config and trained on the shared loop
                       (`training.train.run`; the contract is `training.task.Task`), or
  run(config, workdir) a driver of its own (generation, an active-learning experiment).

Adding a task adds a module here and edits no registry.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re

from common.errors import UserError

_HERE = os.path.dirname(os.path.abspath(__file__))


class UnknownTaskError(UserError):
    pass


# A top-level `class Task`, `def run`, or an assignment to either name, at column 0. A regular
# expression, not ast.parse: CPython 3.11's AST constructor keeps its recursion depth in state shared
# by threads, and a traceback formatted meanwhile on another thread (asyncio, orbax) makes
# ast.parse raise "SystemError: AST constructor recursion depth mismatch".
_EXPORT = re.compile(r"^(?:(?:async\s+)?def\s+(Task|run)\b|class\s+(Task|run)\b|(Task|run)\s*(?::[^=\n]*)?=(?!=))",
                     re.MULTILINE)


def _exports(module_name: str) -> set[str]:
    """Top-level names among Task / run that a task module defines (read from its source, so listing
    the tasks imports none of them)."""
    with open(os.path.join(_HERE, f"{module_name}.py")) as f:
        source = f.read()
    return {name for match in _EXPORT.finditer(source) for name in match.groups() if name}


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
