"""Memory before anything is allocated: the bytes a device holds of the train state and a step's working
set on the configured mesh (from shapes alone), the pre-flight that refuses a run that cannot fit,
and the dry run that prints the sizes."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from common.errors import UserError
from common.memory import GIB, device_memory_bytes, tree_bytes
from common.sharding import (
    MESH_AXES,
    MeshError,
    axes_size,
    batch_shards,
    fitted_spec,
    length_shards,
    mesh_shape,
    rules_from_config,
    spec_axes,
)
from training.step import init_state


class MemoryPlanError(UserError):
    """The configured run cannot fit in the devices' memory."""


def shard_bytes(tree, logical_specs, mesh, rules) -> int:
    """Bytes one device holds of `tree` sharded by `logical_specs` (every shard is the same size:
    `fitted_spec` only splits a dimension over axes that divide it)."""
    total = 0
    with nn.logical_axis_rules(rules):
        for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(logical_specs, is_leaf=lambda v: isinstance(v, P)),
                           strict=True):
            fitted = fitted_spec(x.shape, tuple(spec), mesh)
            shard = [d // axes_size(mesh, spec_axes(e)) for d, e in zip(x.shape, fitted, strict=True)]
            total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
    return total


def memory_plan(task, optimizer, config, mesh, rules, abstract=None) -> dict[str, Any]:
    """Bytes per device of the train state and a step's working set, from shapes alone (nothing is
    allocated): params and optimizer state as sharded, gradients like the params, and the task's
    activation estimate (`task.activation_bytes(rows per device, seq_len, context slices)`)."""
    if abstract is None:
        abstract = jax.eval_shape(functools.partial(init_state, task, optimizer), jax.random.PRNGKey(config.seed))
    specs = task.param_specs(abstract["params"])
    opt_specs = optax.tree_map_params(optimizer, lambda _, sp: sp, abstract["opt_state"], specs,
                                      transform_non_params=lambda _: P())
    params = shard_bytes(abstract["params"], specs, mesh, rules)
    opt = shard_bytes(abstract["opt_state"], opt_specs, mesh, rules)
    rows = max(config.batch_size // config.grad_accum_steps // max(batch_shards(mesh, rules), 1), 1)
    acts = task.activation_bytes(rows, config.get("seq_len", 0), length_shards(mesh, rules))
    frozen, frozen_bytes = task.frozen_inputs(), 0
    if frozen is not None:
        fspecs = frozen.specs if frozen.specs is not None else jax.tree.map(lambda _: P(), frozen.arrays)
        frozen_bytes = shard_bytes(frozen.arrays, fspecs, mesh, rules)
    return {"abstract": abstract, "params": params, "opt_state": opt, "grads": params, "activations": acts,
            "frozen": frozen_bytes, "total": 2 * params + opt + acts + frozen_bytes,
            "param_bytes": tree_bytes(abstract["params"]), "opt_state_bytes": tree_bytes(abstract["opt_state"])}


def check_memory(task, optimizer, config, mesh, rules) -> dict[str, Any]:
    """Refuses (MemoryPlanError) a run whose state and step cannot fit a device, before anything is
    allocated; returns the plan."""
    plan = memory_plan(task, optimizer, config, mesh, rules)
    limit, where = device_memory_bytes()
    if plan["total"] <= 0.9 * limit:
        return plan
    state_total = 2 * plan["param_bytes"] + plan["opt_state_bytes"]  # params, gradients, optimizer state
    state_total += plan["frozen"] * mesh.size  # (the frozen inputs' shards, over all devices)
    devices = math.ceil(state_total / (0.9 * limit))
    advice = (f"the parameters, gradients and optimizer state alone need at least {devices} such devices: "
              "shard them (e.g. --config.mesh.fsdp=-1 with the expert axis, as in the README's pod commands)"
              if devices > mesh.size else
              "fewer rows per device (config.batch_size, config.grad_accum_steps), a shorter config.seq_len, or "
              "config.model.remat_policy='full'")
    raise MemoryPlanError(
        f"this run needs about {plan['total'] / GIB:,.1f} GiB per device on mesh {dict(mesh.shape)} (params "
        f"{plan['params'] / GIB:,.1f} + optimizer state {plan['opt_state'] / GIB:,.1f} + gradients "
        f"{plan['grads'] / GIB:,.1f} + activations ~{plan['activations'] / GIB:,.1f} + frozen inputs "
        f"{plan['frozen'] / GIB:,.1f}) but a device holds "
        f"{limit / GIB:,.1f} GiB ({where}); {advice}; --config.dry_run=True prints the sizes without allocating")


def dry_run(task, optimizer, config) -> dict[str, Any]:
    """Abstract state only (jax.eval_shape): parameter count and bytes, in all and per device of the
    configured mesh over `config.dry_run_devices` devices (0: the devices present, or the fewest the
    mesh's fixed axes need when they do not fit), allocating nothing."""
    n_devices = config.get("dry_run_devices", 0) or jax.device_count()
    try:
        sizes = mesh_shape(config.mesh, n_devices)
    except MeshError:
        if config.get("dry_run_devices", 0):
            raise
        n_devices = math.prod(max(int(config.mesh.get(a, 1)), 1) for a in MESH_AXES)  # the smallest mesh that fits
        sizes = mesh_shape(config.mesh, n_devices)
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    plan = memory_plan(task, optimizer, config, mesh, rules_from_config(config.mesh))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(plan["abstract"]["params"]))
    report = {"params": n_params, "param_bytes": plan["param_bytes"], "opt_state_bytes": plan["opt_state_bytes"],
              "devices": n_devices, "mesh": sizes, "param_bytes_per_device": plan["params"],
              "opt_state_bytes_per_device": plan["opt_state"], "activation_bytes_per_device": plan["activations"],
              "frozen_bytes_per_device": plan["frozen"]}
    print_dry_run(report)
    return report


def print_dry_run(r: dict) -> None:
    print(f"dry run: {r['params']:,} parameters ({r['params'] / 1e9:.2f}B); params {r['param_bytes'] / GIB:.1f} GiB "
          f"+ optimizer state {r['opt_state_bytes'] / GIB:.1f} GiB = "
          f"{(r['param_bytes'] + r['opt_state_bytes']) / GIB:.1f} GiB")
    print(f"per device on mesh {r['mesh']} ({r['devices']} devices): params {r['param_bytes_per_device'] / GIB:.2f} "
          f"GiB + optimizer state {r['opt_state_bytes_per_device'] / GIB:.2f} GiB = "
          f"{(r['param_bytes_per_device'] + r['opt_state_bytes_per_device']) / GIB:.2f} GiB; a step adds "
          f"gradients {r['param_bytes_per_device'] / GIB:.2f} GiB and activations "
          f"~{r['activation_bytes_per_device'] / GIB:.2f} GiB"
          + (f"; frozen inputs (not trained) {r['frozen_bytes_per_device'] / GIB:.2f} GiB"
             if r["frozen_bytes_per_device"] else ""))
