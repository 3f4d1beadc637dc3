"""Tasks by convention: `config.task = "x"` runs `tasks/x.py`, which exports either

  Task                 a `training.task.Task` subclass built from the config and trained on the shared
                       loop (`training.train.run`), or
  run(config, workdir) a driver of its own (generation, an active-learning experiment).

Adding a task adds a module here and edits no registry. A task module is a leaf: it imports no other
module of this package (tests/test_layering.py); what two tasks share lives in the packages below.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from common.errors import UserError

_HERE = os.path.dirname(os.path.abspath(__file__))


class UnknownTaskError(UserError):
    pass


def is_task(module) -> bool:
    return hasattr(module, "Task") or hasattr(module, "run")


def available() -> list[str]:
    """The task names: modules of this package that export Task or run (each imported to find out)."""
    return sorted(m.name for m in pkgutil.iter_modules([_HERE])
                  if not m.ispkg and is_task(importlib.import_module(f"{__name__}.{m.name}")))


def load(name: str):
    """The task module `name` names; UnknownTaskError (listing the tasks) when there is none."""
    if not name:
        raise UnknownTaskError(f"config has no `task` field; the tasks are {available()}")
    if not name.isidentifier() or not os.path.exists(os.path.join(_HERE, f"{name}.py")):
        raise UnknownTaskError(f"unknown task {name!r}: no tasks/{name}.py; the tasks are {available()}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not is_task(module):
        raise UnknownTaskError(f"tasks/{name}.py exports neither Task nor run: it is not a task; the tasks are "
                               f"{available()}")
    return module


def run(config, workdir: str):
    """Runs the task `config.task` names with (config, workdir): its Task on the shared loop, or its run()."""
    module = load(config.get("task", None) if hasattr(config, "get") else getattr(config, "task", None))
    if hasattr(module, "Task"):
        from training import train

        return train.run(module.Task(config), config, workdir)
    return module.run(config, workdir)
