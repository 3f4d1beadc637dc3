"""The training loop every task shares: restore-or-init, jitted step with gradient accumulation,
metrics, eval, checkpoints, progress; the task supplies model, data, loss and eval through the
contract of `training.task.Task` (with optional param specs, frozen inputs and its own optimizer).

Everything runs on the mesh of `config.mesh` (`common.sharding`): the state is created
directly sharded (a jitted init with out_shardings, so no device ever holds the whole model),
restored onto whatever mesh the current config asks for, and every batch is split over the
batch axes. A task's frozen inputs are placed by their own specs, passed to every step beside
the state, and kept out of it: no gradient, no optimizer state, not in the checkpoints (which
record their source and digest).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from common.errors import UserError
from common.sharding import (
    MESH_AXES,
    MeshError,
    axes_size,
    batch_sharding,
    batch_shards,
    fitted_spec,
    make_mesh,
    mesh_shape,
    put_batch,
    rules_from_config,
    sharding_context,
    spec_axes,
    tree_shardings,
)
from training.checkpoint import Checkpointer
from training.data import make_iterator
from training.metrics import MetricsWriter, progress_bar
from training.optim import learning_rate_schedule, make_optimizer
from training.step import init_state, make_train_step

REQUIRED_FIELDS = ("seed", "num_train_steps", "batch_size", "grad_accum_steps", "learning_rate", "warmup_steps",
                   "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip_norm",
                   "log_every_steps", "eval_every_steps", "save_every_steps", "keep_checkpoints", "eval_batches",
                   "dry_run", "mesh")


class ConfigFieldError(UserError):
    """A required config field is missing."""


def task_optimizer(task, config):
    """The task's own optimizer if it has one, else AdamW as the config says."""
    return task.optimizer(config) if hasattr(task, "optimizer") else make_optimizer(config)


def check_config(config) -> None:
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ConfigFieldError(f"config lacks required fields {missing}")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigFieldError(f"config.batch_size={config.batch_size} is not divisible by "
                               f"config.grad_accum_steps={config.grad_accum_steps}")


def state_shardings(task, optimizer, abstract_state, mesh, rules):
    """NamedShardings of the train state: parameters by the task's logical specs and the rules,
    optimizer moments like their parameters, counters and the rng replicated."""
    replicated = NamedSharding(mesh, P())
    params = abstract_state["params"]
    specs = task.param_specs() if hasattr(task, "param_specs") else jax.tree.map(lambda _: P(), params)
    param_sh = tree_shardings(params, specs, mesh, rules)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_state["opt_state"], param_sh,
                                   transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": param_sh, "opt_state": opt_sh, "rng": replicated}


def check_batch_fits(config, mesh, rules) -> None:
    shards, micro = batch_shards(mesh, rules), config.batch_size // config.grad_accum_steps
    if micro % shards:
        raise MeshError(f"config.batch_size / config.grad_accum_steps = {micro} rows per micro-batch do not split "
                        f"over the {shards} batch shards of config.mesh ({dict(mesh.shape)})")
    if config.batch_size % jax.process_count():
        raise MeshError(f"config.batch_size={config.batch_size} does not split over {jax.process_count()} processes")


def evaluate(eval_ds, eval_step, params, max_batches: int, sharding) -> dict[str, float]:
    """eval_loss / eval_perplexity from the summed "nll" over "tokens"; any other sum k the task
    returns is reported as eval_k, divided by its count "k_n" if present, else by "tokens"."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(make_iterator(eval_ds)):
        if i >= max_batches:
            break
        sums = jax.device_get(eval_step(params, put_batch(batch, sharding, jax.process_count())))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    tokens = max(totals.get("tokens", 0.0), 1.0)
    loss = totals.get("nll", 0.0) / tokens
    out = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    for k, v in totals.items():
        if k not in ("nll", "tokens") and not k.endswith("_n"):
            out[f"eval_{k}"] = v / max(totals.get(f"{k}_n", tokens), 1.0)
    return out


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


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



class MemoryPlanError(UserError):
    """The configured run cannot fit in the devices' memory."""


def memory_plan(task, optimizer, config, mesh, rules, abstract=None) -> dict[str, Any]:
    """Bytes per device of the train state and a step's working set, from shapes alone (nothing is
    allocated): params and optimizer state as sharded, gradients like the params, and the task's
    activation estimate (`task.activation_bytes(rows per device, seq_len)`, when it has one)."""
    if abstract is None:
        abstract = jax.eval_shape(functools.partial(init_state, task, optimizer), jax.random.PRNGKey(config.seed))
    specs = task.param_specs() if hasattr(task, "param_specs") else jax.tree.map(lambda _: P(), abstract["params"])
    opt_specs = optax.tree_map_params(optimizer, lambda _, sp: sp, abstract["opt_state"], specs,
                                      transform_non_params=lambda _: P())
    params = shard_bytes(abstract["params"], specs, mesh, rules)
    opt = shard_bytes(abstract["opt_state"], opt_specs, mesh, rules)
    rows = max(config.batch_size // config.grad_accum_steps // max(batch_shards(mesh, rules), 1), 1)
    acts = task.activation_bytes(rows, config.get("seq_len", 0)) if hasattr(task, "activation_bytes") else 0
    return {"abstract": abstract, "params": params, "opt_state": opt, "grads": params, "activations": acts,
            "total": 2 * params + opt + acts, "param_bytes": tree_bytes(abstract["params"]),
            "opt_state_bytes": tree_bytes(abstract["opt_state"])}


def device_memory_bytes() -> tuple[int, str]:
    """(bytes one device can hold, where the figure comes from): the allocator's limit on GPU / TPU;
    on CPU the host's memory shared by the local devices."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind} memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // jax.local_device_count(), f"host memory / {jax.local_device_count()} CPU devices"


def check_memory(task, optimizer, config, mesh, rules) -> dict[str, Any]:
    """Refuses (MemoryPlanError) a run whose state and step cannot fit a device, before anything is
    allocated; returns the plan."""
    plan = memory_plan(task, optimizer, config, mesh, rules)
    limit, where = device_memory_bytes()
    if plan["total"] > 0.9 * limit:
        gib = 2 ** 30
        state_total = 2 * plan["param_bytes"] + plan["opt_state_bytes"]  # params, gradients, optimizer state
        devices = math.ceil(state_total / (0.9 * limit))
        advice = (f"the parameters, gradients and optimizer state alone need at least {devices} such devices: "
                  "shard them (e.g. --config.mesh.fsdp=-1 with the expert axis, as in the README's pod commands)"
                  if devices > mesh.size else
                  "fewer rows per device (config.batch_size, config.grad_accum_steps), a shorter config.seq_len, or "
                  "config.model.remat=True")
        raise MemoryPlanError(
            f"this run needs about {plan['total'] / gib:,.1f} GiB per device on mesh {dict(mesh.shape)} (params "
            f"{plan['params'] / gib:,.1f} + optimizer state {plan['opt_state'] / gib:,.1f} + gradients "
            f"{plan['grads'] / gib:,.1f} + activations ~{plan['activations'] / gib:,.1f}) but a device holds "
            f"{limit / gib:,.1f} GiB ({where}); {advice}; --config.dry_run=True prints the sizes without allocating")
    return plan


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
              "opt_state_bytes_per_device": plan["opt_state"], "activation_bytes_per_device": plan["activations"]}
    gib = 2 ** 30
    print(f"dry run: {n_params:,} parameters ({n_params / 1e9:.2f}B); params {report['param_bytes'] / gib:.1f} GiB "
          f"+ optimizer state {report['opt_state_bytes'] / gib:.1f} GiB = "
          f"{(report['param_bytes'] + report['opt_state_bytes']) / gib:.1f} GiB")
    print(f"per device on mesh {sizes} ({n_devices} devices): params {report['param_bytes_per_device'] / gib:.2f} GiB "
          f"+ optimizer state {report['opt_state_bytes_per_device'] / gib:.2f} GiB = "
          f"{(report['param_bytes_per_device'] + report['opt_state_bytes_per_device']) / gib:.2f} GiB; a step adds "
          f"gradients {report['param_bytes_per_device'] / gib:.2f} GiB and activations "
          f"~{report['activation_bytes_per_device'] / gib:.2f} GiB")
    return report


def run(task, config, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
    """Trains `task` as `config` says, in `workdir`; returns the last logged metrics.

    stop_after: leave the loop after this step as if the process were killed there (tests use it to
    check that a resumed run reproduces the uninterrupted one); pending checkpoint writes finish.
    """
    check_config(config)
    optimizer = task_optimizer(task, config)
    if config.dry_run:
        return dry_run(task, optimizer, config)

    mesh, rules = make_mesh(config.mesh), rules_from_config(config.mesh)
    check_batch_fits(config, mesh, rules)
    check_memory(task, optimizer, config, mesh, rules)
    with sharding_context(mesh, rules):
        return _train(task, optimizer, config, workdir, stop_after, mesh, rules)


def place_frozen(task, mesh, rules) -> tuple[Any, dict | None]:
    """(the task's frozen arrays placed on the mesh by their specs, or None; what checkpoints record)."""
    frozen = task.frozen_inputs() if hasattr(task, "frozen_inputs") else None
    if frozen is None:
        return None, None
    specs = frozen.specs if frozen.specs is not None else jax.tree.map(lambda _: P(), frozen.arrays)
    shardings = tree_shardings(frozen.arrays, specs, mesh, rules)
    return jax.device_put(frozen.arrays, shardings), frozen.record()


def _train(task, optimizer, config, workdir, stop_after, mesh, rules) -> dict[str, Any]:
    pidx, pcount = jax.process_index(), jax.process_count()
    # everything that can fail on the user's inputs fails before the first step
    train_ds, eval_ds = task.train_dataset(pidx, pcount), task.eval_dataset(pidx, pcount)
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    frozen, frozen_record = place_frozen(task, mesh, rules)
    meta = task.meta() if frozen_record is None else {**task.meta(), "frozen_inputs": frozen_record}
    rng = jax.random.PRNGKey(config.seed)
    init_fn = functools.partial(init_state, task, optimizer)
    abstract = jax.eval_shape(init_fn, rng)
    shardings = state_shardings(task, optimizer, abstract, mesh, rules)
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    restored, state, data_state = ckpt.restore_latest(target, meta)
    if restored is None:
        state = jax.jit(init_fn, out_shardings=shardings)(rng)
    else:
        print(f"resumed from {ckpt.directory} at step {restored}")
    data_iter = make_iterator(train_ds, data_state)

    rows = batch_sharding(mesh, rules)
    train_step = jax.jit(make_train_step(task, optimizer, config.grad_accum_steps), donate_argnums=(0,),
                         out_shardings=(shardings, None))
    eval_step = jax.jit(task.eval_sums)
    schedule = learning_rate_schedule(config)
    start = int(state["step"])
    writer = MetricsWriter(workdir, start)  # rows past the restored step (a killed run's) are dropped
    bar = progress_bar(start, config.num_train_steps)
    last_time, window = time.perf_counter(), []
    metrics: dict[str, float] = {}
    for step in range(start + 1, config.num_train_steps + 1):
        state, step_metrics = train_step(state, put_batch(next(data_iter), rows, pcount), frozen)
        window.append(step_metrics)
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
            window = jax.device_get(window)
            now = time.perf_counter()
            tokens = sum(float(m["tokens"]) for m in window)
            metrics = {k: float(np.mean([m[k] for m in window])) for k in window[-1] if k != "tokens"}
            metrics.update(learning_rate=float(schedule(step - 1)), tokens_per_second=tokens / (now - last_time))
            writer.write(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:,.0f}")
            last_time, window = now, []
        if step % config.save_every_steps == 0 or step == config.num_train_steps:  # before eval: a failing
            ckpt.save(step, state, data_iter.get_state(), meta)  # eval loses no training
        if step % config.eval_every_steps == 0 or step == config.num_train_steps:
            eval_metrics = evaluate(eval_ds, functools.partial(eval_step, frozen=frozen), state["params"],
                                    config.eval_batches, rows)
            if hasattr(task, "extra_eval"):  # host-side evaluation (e.g. sampling), reported as eval_<name>
                eval_metrics.update({f"eval_{k}": v for k, v in task.extra_eval(state["params"], frozen).items()})
            writer.write(step, eval_metrics)
            metrics.update(eval_metrics)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        bar.update(1)
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    if stop_after is None or int(state["step"]) >= config.num_train_steps:
        task.on_end(state["params"], frozen)
    return metrics
