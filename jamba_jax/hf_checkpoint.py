"""Hugging Face checkpoints in and out: config.json + safetensors in the Hub's Jamba layout.

The Hub layout (what transformers' `save_pretrained` writes) keeps one tensor per expert
(`model.layers.{i}.feed_forward.experts.{e}.gate_proj.weight`) and torch's [out, in] Linear
weights. `param_table(cfg)` lists, for every HF tensor, where it lives in our Flax tree and how it
is transformed; loading and saving are both driven by that one table.

Loading goes shard by shard: each tensor is read, transformed and written into a preallocated
buffer of its Flax parameter, which becomes a device array (and the buffer is freed) as soon as
all its pieces (all experts of a stack; with `scan_layers`, all repeats of a layer too) have
arrived, so two copies of the weights never coexist.
No pickle: safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from common.errors import UserError
from common.files import atomic_write
from common.tree import get_path, set_path
from jamba_jax.config import JambaConfig
from jamba_jax.layout import layer_location
from jamba_jax.params import abstract_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(UserError):
    """A checkpoint directory or file that does not match what the config says it should hold."""


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    path: tuple[str, ...]  # Flax parameter path
    index: tuple[int, ...]  # indices into the Flax parameter's leading stacked axes ([repeats], [experts])
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _copy(x):
    return x


def _t(x):  # works on numpy arrays and (for shape inference) on jax abstract values alike
    return x.swapaxes(-1, -2)


def _entries_for_layer(cfg: JambaConfig, i: int) -> list[Entry]:
    hf = f"model.layers.{i}"
    fx, at = layer_location(cfg, i)
    d, h = cfg.mamba_d_inner, cfg.hidden_size
    out = [Entry(f"{hf}.input_layernorm.weight", fx + ("input_layernorm", "scale"), at, _copy, _copy),
           Entry(f"{hf}.pre_ff_layernorm.weight", fx + ("pre_ff_layernorm", "scale"), at, _copy, _copy)]
    if cfg.is_attention_layer(i):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(Entry(f"{hf}.self_attn.{p}.weight", fx + ("self_attn", p, "kernel"), at, _t, _t))
    else:
        m, mx = f"{hf}.mamba", fx + ("mamba",)
        out += [
            Entry(f"{m}.in_proj.weight", mx + ("in_proj", "kernel"), at,
                  lambda w: _t(w).reshape(h, 2, d), lambda k: _t(k.reshape(h, 2 * d))),
            Entry(f"{m}.conv1d.weight", mx + ("conv_kernel",), at,
                  lambda w: _t(w[:, 0, :]), lambda k: _t(k)[:, None, :]),
            Entry(f"{m}.x_proj.weight", mx + ("x_proj", "kernel"), at, _t, _t),
            Entry(f"{m}.dt_proj.weight", mx + ("dt_proj_kernel",), at, _t, _t),
            Entry(f"{m}.dt_proj.bias", mx + ("dt_proj_bias",), at, _copy, _copy),
            Entry(f"{m}.out_proj.weight", mx + ("out_proj", "kernel"), at, _t, _t),
            Entry(f"{m}.A_log", mx + ("A_log",), at, _copy, _copy),
            Entry(f"{m}.D", mx + ("D",), at, _copy, _copy),
            Entry(f"{m}.dt_layernorm.weight", mx + ("dt_layernorm", "scale"), at, _copy, _copy),
            Entry(f"{m}.b_layernorm.weight", mx + ("b_layernorm", "scale"), at, _copy, _copy),
            Entry(f"{m}.c_layernorm.weight", mx + ("c_layernorm", "scale"), at, _copy, _copy),
        ]
        if cfg.mamba_conv_bias:
            out.append(Entry(f"{m}.conv1d.bias", mx + ("conv_bias",), at, _copy, _copy))
        if cfg.mamba_proj_bias:
            out += [Entry(f"{m}.in_proj.bias", mx + ("in_proj", "bias"), at,
                          lambda b: b.reshape(2, d), lambda b: b.reshape(2 * d)),
                    Entry(f"{m}.out_proj.bias", mx + ("out_proj", "bias"), at, _copy, _copy)]
    ff, ffx = f"{hf}.feed_forward", fx + ("feed_forward",)
    if cfg.is_moe_layer(i):
        out.append(Entry(f"{ff}.router.weight", ffx + ("router", "kernel"), at, _t, _t))
        for e in range(cfg.num_experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                out.append(Entry(f"{ff}.experts.{e}.{p}.weight", ffx + ("experts", p), at + (e,), _t, _t))
    else:
        for p in ("gate_proj", "up_proj", "down_proj"):
            out.append(Entry(f"{ff}.{p}.weight", ffx + (p, "kernel"), at, _t, _t))
    return out


def param_table(cfg: JambaConfig) -> list[Entry]:
    """Every HF tensor of a Jamba checkpoint with its Flax location and transforms."""
    table = [Entry("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), (), _copy, _copy)]
    for i in range(cfg.num_hidden_layers):
        table += _entries_for_layer(cfg, i)
    table.append(Entry("model.final_layernorm.weight", ("model", "final_layernorm", "scale"), (), _copy, _copy))
    if not cfg.tie_word_embeddings:
        table.append(Entry("lm_head.weight", ("lm_head",), (), _t, _t))
    return table


def _hf_shape(entry: Entry, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for a Flax parameter shape, inferred abstractly (nothing allocated)."""
    slice_shape = flax_shape[len(entry.index):]
    return tuple(jax.eval_shape(entry.to_hf, jax.ShapeDtypeStruct(slice_shape, jnp.float32)).shape)


def _shard_files(path: str) -> dict[str, list[str] | None]:
    """{file: keys the index assigns to it (None when there is no index)}; checks files exist."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(fname, []).append(key)
        missing = sorted(f for f in files if not os.path.exists(os.path.join(path, f)))
        if missing:
            raise CheckpointError(f"{path}: shards named in {INDEX_FILE} are missing: {missing}")
        return dict(files)
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return {SINGLE_FILE: None}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")


def read_hf_config(path: str, **overrides) -> JambaConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    with open(cfg_path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    return JambaConfig.from_hf_dict(d, **overrides)


def _checked_files(path: str, table: dict[str, Entry]) -> dict[str, list[str]]:
    """{shard file: its keys}, having checked the checkpoint holds exactly the table's keys."""
    files = _shard_files(path)
    if files == {SINGLE_FILE: None}:  # no index: the keys come from the single file's header
        files[SINGLE_FILE] = list(_open(os.path.join(path, SINGLE_FILE)).keys())
    present = {k for keys in files.values() for k in keys}
    missing = sorted(set(table) - present)
    unexpected = sorted(present - set(table))
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match the config: missing keys {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected keys "
                              f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})")
    return files


class _Assembler:
    """Builds the parameter tree tensor by tensor: a stack (all experts of a layer; with `scan_layers`, all
    repeats too) fills a numpy buffer piece by piece and becomes a device array once complete, the
    buffer then freed; an ExpertsInt8 weight is quantised as it is stored."""

    def __init__(self, cfg: JambaConfig, quantize: str | None, path: str, shardings=None):
        self.params: dict[str, Any] = {}
        self._shardings = shardings
        self._pending: dict[tuple[str, ...], list] = {}  # path -> [numpy buffer, pieces still to come]
        self._quant_paths = {}
        if quantize:
            from jamba_jax.quantization import QuantizationError, quantized_weights

            if not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
                raise QuantizationError(f"{path}: the config has no mixture-of-experts layer to quantise")
            self._quant_paths = {p + (name,): scale for p, name, scale in quantized_weights(cfg, include_mlp=True)}

    def _place(self, fpath, value_np):
        """A device array of value_np: on the default device, or over its sharding, each device's part
        copied from the host array (every process reads the tensor; no process holds more than one)."""
        if self._shardings is None:
            return jnp.asarray(value_np)
        sharding = get_path(self._shardings, fpath)
        return jax.make_array_from_callback(value_np.shape, sharding, lambda index: value_np[index])

    def _store(self, fpath, value_np):
        if fpath in self._quant_paths:
            from jamba_jax.quantization import quantize_int8

            q, scale = quantize_int8(value_np, xp=np)
            scale_path = fpath[:-1] + (self._quant_paths[fpath],)
            set_path(self.params, fpath, self._place(fpath, q))
            set_path(self.params, scale_path, self._place(scale_path, scale))
        else:
            set_path(self.params, fpath, self._place(fpath, value_np))

    def add(self, entry: Entry, value, flax_shape: tuple[int, ...]) -> None:
        if not entry.index:
            return self._store(entry.path, value)
        if entry.path not in self._pending:
            self._pending[entry.path] = [np.empty(flax_shape, value.dtype),
                                         int(np.prod(flax_shape[:len(entry.index)]))]
        slot = self._pending[entry.path]
        slot[0][entry.index] = value
        slot[1] -= 1
        if slot[1] == 0:
            self._store(entry.path, self._pending.pop(entry.path)[0])


def load_hf_checkpoint(path: str, quantize: str | None = None, shardings=None,
                       **config_overrides) -> tuple[JambaConfig, dict]:
    """Reads a local HF Jamba directory. `config_overrides` set our fields (dtype, param_dtype, scan_layers, ...).

    quantize="experts_int8" quantises each expert stack and dense MLP weight as soon as it is read
    (jamba_jax.quantization), so the full-precision model never sits in memory. `shardings` (a tree like
    the params, quantised or not) places each tensor directly over its devices as it completes: the train
    state of a fine-tuning run is built this way, one tensor on the host at a time.
    Returns (cfg, params) with params a plain nested dict of arrays in `cfg.param_dtype`.
    """
    cfg = read_hf_config(path, **config_overrides)
    if quantize not in (None, "experts_int8"):
        raise CheckpointError(f"quantize={quantize!r}; the supported scheme is 'experts_int8'")
    shapes = abstract_params(cfg)
    table = {e.hf_key: e for e in param_table(cfg)}
    assembler = _Assembler(cfg, quantize, path, shardings)
    files = _checked_files(path, table)
    bar = tqdm(total=len(table), desc=f"loading {os.path.basename(os.path.normpath(path))}", unit="tensor",
               disable=None, leave=False)  # disable=None: shown on a terminal only
    for fname, keys in sorted(files.items()):
        fpath = os.path.join(path, fname)
        handle = _open(fpath)
        in_file = set(handle.keys())
        if not set(keys) <= in_file:
            raise CheckpointError(f"{fpath}: the index lists keys this file lacks: {sorted(set(keys) - in_file)[:8]}")
        for key in keys:
            entry = table[key]
            flax_shape = tuple(get_path(shapes, entry.path).shape)
            want, got = _hf_shape(entry, flax_shape), tuple(handle.get_slice(key).get_shape())
            if got != want:
                raise CheckpointError(f"{fpath}: tensor {key} has shape {got}, the config implies {want}")
            try:
                value = entry.to_flax(handle.get_tensor(key)).astype(cfg.weights_dtype)
            except SafetensorError as e:
                raise CheckpointError(f"{fpath}: cannot read tensor {key}: {e}") from e
            assembler.add(entry, value, flax_shape)
            bar.update(1)
    bar.close()
    return cfg, assembler.params


def _open(fpath: str):
    try:
        return safe_open(fpath, framework="np")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{fpath}: not a readable safetensors file ({e})") from e


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def save_hf_checkpoint(cfg: JambaConfig, params: dict[str, Any], path: str,
                       max_shard_bytes: int = 5 * 1024**3, dtype: Any = None) -> None:
    """Writes `path/config.json` and safetensors shards (with an index above `max_shard_bytes`) that
    transformers' `JambaForCausalLM.from_pretrained` loads with no missing or unexpected keys.
    Each file is written to a temporary name and renamed into place."""
    params = nn.unbox(params)
    shapes = abstract_params(cfg)
    table = param_table(cfg)
    for entry in table:
        try:
            got = tuple(get_path(params, entry.path).shape)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"params lack {'/'.join(entry.path)} that the config requires") from e
        want = tuple(get_path(shapes, entry.path).shape)
        if got != want:
            raise CheckpointError(f"params {'/'.join(entry.path)} has shape {got}, the config implies {want}")

    def out_dtype(entry):
        return np.dtype(dtype) if dtype is not None else np.dtype(get_path(params, entry.path).dtype)

    # Plan the shards from shapes alone, then materialise one shard at a time.
    shards: list[list[Entry]] = [[]]
    size = total = 0
    for entry in table:
        full = get_path(shapes, entry.path).shape
        nbytes = _nbytes(full[len(entry.index):], out_dtype(entry))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
        total += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for name, entries in tqdm(list(zip(names, shards, strict=True)), desc=f"writing {os.path.basename(path)}",
                              unit="shard", disable=None, leave=False):
        tensors = {}
        for entry in entries:
            value = get_path(params, entry.path)
            if entry.index:
                value = value[entry.index]
            tensors[entry.hf_key] = np.ascontiguousarray(entry.to_hf(np.asarray(value).astype(out_dtype(entry))))
            weight_map[entry.hf_key] = name
        atomic_write(os.path.join(path, name), lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(os.path.join(path, INDEX_FILE), lambda tmp: _write_json(tmp, index))
    elif os.path.exists(os.path.join(path, INDEX_FILE)):
        os.remove(os.path.join(path, INDEX_FILE))  # a stale index would shadow the single file
    hf_cfg = cfg.to_hf_dict()
    if dtype is not None:
        hf_cfg["dtype"] = np.dtype(dtype).name
    atomic_write(os.path.join(path, "config.json"), lambda tmp: _write_json(tmp, hf_cfg))


def _write_json(fpath, obj):
    with open(fpath, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
