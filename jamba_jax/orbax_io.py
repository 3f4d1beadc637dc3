"""Orbax checkpoints of Jamba parameters: `<dir>/jamba_config.json` + `<dir>/params` (an orbax
PyTree checkpoint, written atomically by orbax: a run killed mid-save leaves no half checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from jamba_jax.config import JambaConfig
from jamba_jax.hf_checkpoint import CheckpointError
from jamba_jax.params import abstract_params

CONFIG_FILE = "jamba_config.json"
PARAMS_DIR = "params"
QUANT_FILE = "quantization.json"  # present when the params are ExpertsInt8-quantised


def save_config(cfg: JambaConfig, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2, sort_keys=True)


def load_config(directory: str, **overrides) -> JambaConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a jamba_jax orbax checkpoint")
    with open(path) as f:
        d = json.load(f)
    d.update(overrides)
    return JambaConfig.from_dict(d)


def save_params(cfg: JambaConfig, params: dict[str, Any], directory: str) -> None:
    directory = os.path.abspath(directory)
    target = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(target):
        raise CheckpointError(f"{target} exists already; choose a new directory")
    save_config(cfg, directory)
    from jamba_jax.quantization import check_quantized, is_quantized

    if is_quantized(params):
        check_quantized(cfg, params)
        with open(os.path.join(directory, QUANT_FILE), "w") as f:
            json.dump({"scheme": "experts_int8", "include_mlp": True}, f)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, nn.unbox(params))
        ckptr.wait_until_finished()


def load_params(directory: str, shardings=None, **overrides) -> tuple[JambaConfig, dict[str, Any]]:
    """Restores (cfg, params); `overrides` set our config fields (e.g. param_dtype="bfloat16"; not the layer
    layout: `scan_layers` is the saved one); `shardings` (a tree like the params) places each array."""
    directory = os.path.abspath(directory)
    cfg = load_config(directory, **overrides)
    target = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(target):
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ orbax checkpoint")
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params(cfg))
    if shardings is not None:
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    quantized = os.path.exists(os.path.join(directory, QUANT_FILE))
    if quantized:
        from jamba_jax.quantization import check_quantized, quantize_experts_int8

        abstract = jax.eval_shape(lambda p: quantize_experts_int8(cfg, p), abstract)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(target, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{target}: does not match the config in {CONFIG_FILE}: {e}") from e
    if quantized:
        check_quantized(cfg, params)
    return cfg, params
