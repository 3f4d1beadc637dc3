"""One loader for every kind of Jamba checkpoint: `load_checkpoint(path)` reads

  a Hugging Face directory      config.json + *.safetensors (`jamba_jax.hf_checkpoint`)
  a converted orbax directory   jamba_config.json + params/ (`jamba_jax.orbax_io`, `tasks.convert`)
  a training workdir            a `jamba_lm` run's newest intact step, or `step` (`common.checkpoints`); a
                                LoRA run's adapters merged into the base it recorded (`load_lora_run`)

and `locate_checkpoint(path)` says which one a path is and identifies its bytes (source and digest),
so that whoever freezes or fine-tunes a checkpoint can record where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax

from common.checkpoints import CheckpointNotFoundError, directory_digest, restore_run_params
from jamba_jax.config import JambaConfig
from jamba_jax.hf_checkpoint import CheckpointError, load_hf_checkpoint, read_hf_config
from jamba_jax.layout import to_scanned, to_unrolled
from jamba_jax.lora import LoraConfig, init_adapters, merged_weights
from jamba_jax.orbax_io import CONFIG_FILE, load_config, load_params
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


def checkpoint_config(path, step: int | None = None) -> JambaConfig:
    """The JambaConfig a checkpoint of any kind holds, read without its parameters."""
    source = path if isinstance(path, CheckpointSource) else locate_checkpoint(path, step)
    if source.kind == "hf":
        return read_hf_config(source.path)
    if source.kind == "orbax":
        return load_config(source.path)
    meta, _, _ = restore_run_params(source.path, None, source.step)
    return JambaConfig.from_dict(meta["model"])


def load_checkpoint(path, step: int | None = None, quantize: str | None = None, shardings=None,
                    **overrides) -> tuple[JambaConfig, dict]:
    """(cfg, params) of a Jamba checkpoint of any kind (module docstring). `overrides` set fields that do
    not change the weights (dtype, param_dtype: the loaded arrays', scan_layers: their layout, ...);
    `shardings` (a tree like the params, in the overridden layout) places each array over its devices as it
    loads; `quantize="experts_int8"` quantises them (ExpertsInt8) as they load."""
    source = path if isinstance(path, CheckpointSource) else locate_checkpoint(path, step)
    if source.kind == "hf":  # quantised and placed tensor by tensor as it reads, in the asked layout
        return load_hf_checkpoint(source.path, quantize=quantize or None, shardings=shardings, **overrides)
    saved = checkpoint_config(source)
    cfg = saved.replace(**overrides)
    as_saved = {k: v for k, v in overrides.items() if k != "scan_layers"}
    place_now = shardings if cfg.scan_layers == saved.scan_layers and not quantize else None
    if source.kind == "orbax":
        _, params = load_params(source.path, place_now, **as_saved)
    elif (run := load_lora_run(source)) is not None:
        saved, base, adapters, lora = run
        params, place_now = merged_weights(saved, base, adapters, lora.scale), None
    else:
        target = abstract_params(saved.replace(**as_saved))
        if place_now is not None:
            target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), target, place_now)
        _, params, _ = restore_run_params(source.path, target, source.step)
    if cfg.scan_layers != saved.scan_layers:
        params = (to_scanned if cfg.scan_layers else to_unrolled)(saved, params)
    if quantize:
        params = quantize_experts_int8(cfg, params)
    if shardings is not None and place_now is None:
        params = jax.device_put(params, shardings)
    return cfg, params


def _run_meta(source: CheckpointSource) -> dict:
    return restore_run_params(source.path, None, source.step)[0]


def load_lora_run(source: CheckpointSource):
    """(cfg, base, adapters, LoraConfig) of a training workdir whose run trained LoRA adapters (None for any
    other checkpoint): the base read from where the run recorded it, refused if its bytes changed since."""
    if source.kind != "workdir" or "lora" not in (meta := _run_meta(source)):
        return None
    record = meta["frozen_inputs"]
    match = re.fullmatch(r"(.*) \(step (\d+)\)", record["source"])
    base_source = locate_checkpoint(*((match.group(1), int(match.group(2))) if match else (record["source"], None)))
    if base_source.digest() != record["digest"]:
        raise CheckpointError(f"{source.description} holds LoRA adapters of the base at {base_source.description}, "
                              f"which has changed since (digest {base_source.digest()}, the run recorded "
                              f"{record['digest']})")
    cfg, lora = JambaConfig.from_dict(meta["model"]), LoraConfig(**{**meta["lora"], "targets": tuple(
        meta["lora"]["targets"])})
    _, base = load_checkpoint(base_source, quantize=lora.base_quantize or None, **cfg.weight_neutral())
    abstract = jax.eval_shape(lambda: init_adapters(cfg, lora, jax.random.PRNGKey(0)))
    _, adapters, _ = restore_run_params(source.path, abstract, source.step)
    return cfg, base, adapters, lora


def checkpoint_tokenizer(path) -> str:
    """The tokenizer a checkpoint was trained with: a directory's tokenizer.json, or the one a training run
    recorded ("" when it says nothing: the caller's default)."""
    source = path if isinstance(path, CheckpointSource) else locate_checkpoint(path)
    if source.kind != "workdir":
        own = os.path.join(source.path, "tokenizer.json")
        return own if os.path.exists(own) else ""
    return _run_meta(source).get("provenance", {}).get("tokenizer", "")


def checkpoint_end_tokens(source: CheckpointSource, tokenizer) -> int | list[int] | None:
    """The ids that end a reply: the tokenizer's <eos>, and the end tokens an HF checkpoint's
    generation_config.json names (Jamba-1.5's end of message); an int, a list, or None."""
    ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    path = os.path.join(source.path, "generation_config.json")
    if source.kind == "hf" and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            listed = json.load(f).get("eos_token_id")
        ids += [i for i in (listed if isinstance(listed, list) else [listed]) if isinstance(i, int) and i not in ids]
    return ids[0] if len(ids) == 1 else (ids or None)
