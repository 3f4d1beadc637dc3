"""Task registry: `config.task` names what main.py runs with (config, workdir)."""

from __future__ import annotations


def _jamba_lm(config, workdir):
    from tasks.jamba_lm import JambaLMTask
    from training import train

    return train.run(JambaLMTask(config), config, workdir)


def _generate(config, workdir):
    from tasks import generate

    return generate.run(config, workdir)


def _sensebert(module: str, cls: str):
    def run(config, workdir):
        import importlib

        from training import train

        return train.run(getattr(importlib.import_module(f"tasks.{module}"), cls)(config), config, workdir)

    return run


TASKS = {"jamba_lm": _jamba_lm, "generate": _generate,
         "sensebert_pretrain": _sensebert("sensebert", "SenseBertPretrainTask"),
         "sensebert_tagging": _sensebert("sensebert_finetune", "SupersenseTaggingTask"),
         "sensebert_wic": _sensebert("sensebert_finetune", "WordInContextTask")}


class UnknownTaskError(ValueError):
    pass


def run(config, workdir: str):
    if "task" not in config:
        raise UnknownTaskError(f"config has no `task` field; expected one of {sorted(TASKS)}")
    if config.task not in TASKS:
        raise UnknownTaskError(f"unknown task {config.task!r}; expected one of {sorted(TASKS)}")
    return TASKS[config.task](config, workdir)
