"""The bundled configs, one `get_config()` per runnable job. `resolve` lets a command name one by its name
(`--config=jamba_tiny`) or by its path in the repository (`--config=configs/jamba_tiny.py`) from any
directory, installed or not."""

from __future__ import annotations

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def bundled() -> list[str]:
    """The names of the bundled configs."""
    return sorted(f[:-3] for f in os.listdir(DIRECTORY)
                  if f.endswith(".py") and not f.startswith("_") and f != "common.py")


def resolve(path_or_name: str) -> str:
    """An existing file as given; else the bundled config of that name (`jamba_tiny`, `jamba_tiny.py` or
    `configs/jamba_tiny.py`); else the argument unchanged (the caller reports it missing)."""
    if os.path.exists(path_or_name):
        return path_or_name
    name = os.path.basename(path_or_name)
    name = name[:-3] if name.endswith(".py") else name
    parent = os.path.basename(os.path.dirname(path_or_name))
    if name in bundled() and parent in ("", "configs"):
        return os.path.join(DIRECTORY, f"{name}.py")
    return path_or_name
