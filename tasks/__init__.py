"""Task registry: `config.task` names the task main.py trains with the shared loop."""

from __future__ import annotations

from training import train


def _jamba_lm(config):
    from tasks.jamba_lm import JambaLMTask

    return JambaLMTask(config)


TASKS = {"jamba_lm": _jamba_lm}


class UnknownTaskError(ValueError):
    pass


def run(config, workdir: str):
    if "task" not in config:
        raise UnknownTaskError(f"config has no `task` field; expected one of {sorted(TASKS)}")
    if config.task not in TASKS:
        raise UnknownTaskError(f"unknown task {config.task!r}; expected one of {sorted(TASKS)}")
    return train.run(TASKS[config.task](config), config, workdir)
