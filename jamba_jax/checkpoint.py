"""One loader for every kind of Jamba checkpoint: `load_checkpoint(path)` reads

  a Hugging Face directory      config.json + *.safetensors (`jamba_jax.hf_checkpoint`)
  a converted orbax directory   jamba_config.json + params/ (`jamba_jax.orbax_io`, `tasks.convert`)
  a training workdir            a `jamba_lm` run's newest intact step, or `step` (`common.checkpoints`)

and `locate_checkpoint(path)` says which one a path is and identifies its bytes (source and digest),
so that whoever freezes or fine-tunes a checkpoint can record where it came from.
"""

from __future__ import annotations

import dataclasses
import os

from common.checkpoints import CheckpointNotFoundError, directory_digest, restore_run_params
from jamba_jax.config import JambaConfig
from jamba_jax.hf_checkpoint import CheckpointError, load_hf_checkpoint
from jamba_jax.orbax_io import CONFIG_FILE, load_params
from jamba_jax.params import abstract_params
from jamba_jax.quantization import quantize_experts_int8

LM_TASK = "jamba_lm"  # the task whose runs hold a causal Jamba


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    path: str  # absolute
    kind: str  # "hf" | "orbax" | "workdir"
    step: int | None = None  # a workdir's step

    @property
    def description(self) -> str:
        return self.path if self.step is None else f"{self.path} (step {self.step})"

    def digest(self) -> str:
        """Identifies the bytes read (`common.checkpoints.directory_digest`)."""
        return directory_digest(self.path, self.step)


def locate_checkpoint(path: str, step: int | None = None) -> CheckpointSource:
    """Which kind of Jamba checkpoint `path` is (a workdir's step resolved to its newest intact one);
    CheckpointError naming what it holds instead."""
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory: expected a Hugging Face Jamba directory, a converted "
                              f"orbax directory or a {LM_TASK} training workdir")
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, CONFIG_FILE)) or os.path.exists(os.path.join(path, "config.json")):
        if step is not None:
            raise CheckpointError(f"{path} holds one set of parameters; a step is for training workdirs")
        return CheckpointSource(path, "orbax" if os.path.exists(os.path.join(path, CONFIG_FILE)) else "hf")
    try:
        meta, _, step = restore_run_params(path, None, step)  # the metadata first: which model is it?
    except CheckpointNotFoundError as e:
        raise CheckpointError(f"{path}: holds neither config.json, {CONFIG_FILE} nor a training checkpoint ({e})") \
            from e
    if "model" not in meta or meta.get("task", LM_TASK) != LM_TASK:
        raise CheckpointError(f"{path} (step {step}) is a {meta.get('task')!r} run, not a causal language model "
                              f"(a {LM_TASK} run)")
    return CheckpointSource(path, "workdir", step)


def load_checkpoint(path: str, step: int | None = None, quantize: str | None = None) -> tuple[JambaConfig, dict]:
    """(cfg, params) of a Jamba checkpoint of any kind (module docstring); `quantize="experts_int8"`
    quantises them (ExpertsInt8) as they load."""
    source = path if isinstance(path, CheckpointSource) else locate_checkpoint(path, step)
    if source.kind == "hf":
        return load_hf_checkpoint(source.path, quantize=quantize or None)  # quantised tensor by tensor as read
    if source.kind == "orbax":
        cfg, params = load_params(source.path)
    else:
        meta, _, _ = restore_run_params(source.path, None, source.step)
        cfg = JambaConfig.from_dict(meta["model"])
        _, params, _ = restore_run_params(source.path, abstract_params(cfg), source.step)
    return (cfg, quantize_experts_int8(cfg, params)) if quantize else (cfg, params)
