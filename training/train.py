"""The training loop every task shares: restore-or-init, jitted step with gradient accumulation,
metrics, eval, checkpoints, progress; the task supplies model, data, loss and eval through the
`training.task.Task` base class (with param specs, frozen inputs and its own optimizer as hooks).

Everything runs on the mesh of `config.mesh` (`common.sharding`): the state is created
directly sharded (a jitted init with out_shardings, so no device ever holds the whole model),
restored onto whatever mesh the current config asks for, and every batch is split over the
batch axes. A task's frozen inputs are placed by their own specs, passed to every step beside
the state, and kept out of it: no gradient, no optimizer state, not in the checkpoints (which
record their source and digest).

The trip a config takes: `tasks.run` builds the task from it and calls `run` here, which checks the
loop's fields, sizes the run (`training.memory`), builds the mesh, and then `_Run` prepares the data,
the checkpointer and the state and steps through `config.num_train_steps`.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from common.errors import UserError
from common.sharding import (
    MeshError,
    batch_sharding,
    batch_shards,
    length_shards,
    make_mesh,
    put_batch,
    row_blocks,
    rules_from_config,
    sharding_context,
    tree_shardings,
)
from training.checkpoint import Checkpointer
from training.data import make_iterator
from training.memory import check_memory, dry_run
from training.metrics import MetricsWriter, progress_bar
from training.optim import learning_rate_schedule
from training.step import init_state, make_train_step, per_count, state_from_params

REQUIRED_FIELDS = ("seed", "num_train_steps", "batch_size", "grad_accum_steps", "learning_rate", "warmup_steps",
                   "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip_norm",
                   "log_every_steps", "eval_every_steps", "save_every_steps", "keep_checkpoints", "eval_batches",
                   "dry_run", "mesh")


class ConfigFieldError(UserError):
    """A required config field is missing."""


def check_config(config) -> None:
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ConfigFieldError(f"config lacks required fields {missing}")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigFieldError(f"config.batch_size={config.batch_size} is not divisible by "
                               f"config.grad_accum_steps={config.grad_accum_steps}")


def check_batch_fits(config, mesh, rules) -> tuple[int, int]:
    """Refuses a batch the mesh cannot split; returns (this process's block of rows, the blocks: `row_blocks`)."""
    shards, micro = batch_shards(mesh, rules), config.batch_size // config.grad_accum_steps
    if micro % shards:
        raise MeshError(f"config.batch_size / config.grad_accum_steps = {micro} rows per micro-batch do not split "
                        f"over the {shards} batch shards of config.mesh ({dict(mesh.shape)})")
    block, blocks = row_blocks(batch_sharding(mesh, rules), config.batch_size, jax.process_index())
    if config.batch_size % blocks:
        raise MeshError(f"config.batch_size={config.batch_size} does not split into the {blocks} blocks of rows the "
                        "processes load")
    check_length_fits(config, mesh, rules)
    return block, blocks


def check_length_fits(config, mesh, rules) -> None:
    """Context parallelism: every row splits into equal slices, each at least the Mamba conv's halo long."""
    shards = length_shards(mesh, rules)
    if shards == 1:
        return
    seq_len, halo = config.get("seq_len", 0), config.model.get("mamba_d_conv", 4) - 1 if "model" in config else 0
    if seq_len % shards:
        raise MeshError(f"config.seq_len={seq_len} does not split into the {shards} slices of config.mesh.context; "
                        f"use a multiple of {shards}")
    if seq_len // shards < max(halo, 1):
        raise MeshError(f"config.seq_len={seq_len} over {shards} context slices leaves {seq_len // shards} tokens a "
                        f"slice, shorter than the Mamba conv's halo ({halo}); use fewer slices or longer rows")


def state_shardings(task, optimizer, abstract_state, mesh, rules):
    """NamedShardings of the train state: parameters by the task's logical specs and the rules,
    optimizer moments like their parameters, counters and the rng replicated."""
    replicated = NamedSharding(mesh, P())
    params = abstract_state["params"]
    param_sh = tree_shardings(params, task.param_specs(params), mesh, rules)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_state["opt_state"], param_sh,
                                   transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": param_sh, "opt_state": opt_sh, "rng": replicated}


def evaluate(eval_ds, eval_step, params, max_batches: int, sharding, blocks: int) -> dict[str, float]:
    """eval_loss / eval_perplexity from the summed "loss" over "tokens"; every other sum k the task
    returns as eval_k, divided by its count "k_n" if present, else by "tokens"."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(make_iterator(eval_ds)):
        if i >= max_batches:
            break
        sums = jax.device_get(eval_step(params, put_batch(batch, sharding, blocks)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    totals.setdefault("loss", 0.0)
    totals.setdefault("tokens", 0.0)
    means = per_count(totals, max)
    loss = means.pop("loss")
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), **{f"eval_{k}": v for k, v in
                                                                               means.items()}}


def place_frozen(task, mesh, rules) -> tuple[Any, dict | None]:
    """(the task's frozen arrays placed on the mesh by their specs, or None; what checkpoints record)."""
    frozen = task.frozen_inputs()
    if frozen is None:
        return None, None
    specs = frozen.specs if frozen.specs is not None else jax.tree.map(lambda _: P(), frozen.arrays)
    shardings = tree_shardings(frozen.arrays, specs, mesh, rules)
    arrays = frozen.load(shardings) if frozen.load is not None else jax.device_put(frozen.arrays, shardings)
    return arrays, frozen.record()


def run(task, config, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
    """Trains `task` as `config` says, in `workdir`; returns the last logged metrics.

    stop_after: leave the loop after this step as if the process were killed there (tests use it to
    check that a resumed run reproduces the uninterrupted one); pending checkpoint writes finish.
    """
    check_config(config)
    optimizer = task.optimizer(config)
    if config.dry_run:
        return dry_run(task, optimizer, config)
    mesh, rules = make_mesh(config.mesh), rules_from_config(config.mesh)
    rows = check_batch_fits(config, mesh, rules)
    check_memory(task, optimizer, config, mesh, rules)
    with sharding_context(mesh, rules):
        return _Run(task, optimizer, config, workdir, mesh, rules, rows).train(stop_after)


class _Run:
    """One training run: its data, checkpointer, frozen inputs and state, then the loop."""

    def __init__(self, task, optimizer, config, workdir: str, mesh, rules, rows: tuple[int, int]):
        self.task, self.config, self.workdir = task, config, workdir
        block, self.blocks = rows  # this process loads block `block` of every batch's rows (`row_blocks`)
        # everything that can fail on the user's inputs fails before the first step
        self.train_ds, self.eval_ds = task.train_dataset(block, self.blocks), task.eval_dataset(block, self.blocks)
        self.ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
        self.frozen, frozen_record = place_frozen(task, mesh, rules)
        self.meta = task.meta() if frozen_record is None else {**task.meta(), "frozen_inputs": frozen_record}
        self.rows = batch_sharding(mesh, rules)
        rng = jax.random.PRNGKey(config.seed)
        init_fn = functools.partial(init_state, task, optimizer)
        abstract = jax.eval_shape(init_fn, rng)
        shardings = state_shardings(task, optimizer, abstract, mesh, rules)
        target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
        restored, self.state, data_state = self.ckpt.restore_latest(target, self.meta)
        self.resumed = restored is not None
        if restored is not None:
            print(f"resumed from {self.ckpt.directory} at step {restored}")
        elif (start := task.initial_params(shardings["params"])) is not None:  # a fine-tuning start
            self.state = jax.jit(functools.partial(state_from_params, optimizer), out_shardings=shardings,
                                 donate_argnums=(0,))(start, rng)
        else:
            self.state = jax.jit(init_fn, out_shardings=shardings)(rng)
        self.data_iter = make_iterator(self.train_ds, data_state)
        self.train_step = jax.jit(make_train_step(task, optimizer, config.grad_accum_steps), donate_argnums=(0,),
                                  out_shardings=(shardings, None))
        self.eval_step = jax.jit(task.eval_sums)

    def train(self, stop_after: int | None) -> dict[str, Any]:
        c, start = self.config, int(self.state["step"])
        if self.resumed and start >= c.num_train_steps:
            print(f"this run is complete: {self.ckpt.directory} holds step {start} of config.num_train_steps="
                  f"{c.num_train_steps}; raise num_train_steps to train further")
        writer = MetricsWriter(self.workdir, start)  # rows past the restored step (a killed run's) are dropped
        bar = progress_bar(start, c.num_train_steps)
        self._last_time, self._window, metrics = time.perf_counter(), [], {}
        if start == 0 and c.get("eval_at_start", False):  # the starting point's row (e.g. a frozen LM alone)
            metrics = self._eval(0, writer, bar)
        for step in range(start + 1, c.num_train_steps + 1):
            self.state, step_metrics = self.train_step(self.state, put_batch(next(self.data_iter), self.rows,
                                                                             self.blocks), self.frozen)
            self._window.append(step_metrics)
            if step % c.log_every_steps == 0 or step == c.num_train_steps:
                metrics = self._log(step, writer, bar)
            if step % c.save_every_steps == 0 or step == c.num_train_steps:  # before eval: a failing
                self.ckpt.save(step, self.state, self.data_iter.get_state(), self.meta)  # eval loses no training
            if step % c.eval_every_steps == 0 or step == c.num_train_steps:
                metrics.update(self._eval(step, writer, bar))
            bar.update(1)
            if stop_after is not None and step >= stop_after:
                break
        bar.close()
        self.ckpt.wait()
        self.ckpt.close()
        writer.close()
        if stop_after is None or int(self.state["step"]) >= c.num_train_steps:
            self.task.on_end(self.state["params"], self.frozen)
        return metrics

    def _log(self, step: int, writer, bar) -> dict[str, float]:
        """Means of the metrics since the last log, with the learning rate and tokens/s."""
        window, now = jax.device_get(self._window), time.perf_counter()
        tokens = sum(float(m["tokens"]) for m in window)
        metrics = {k: float(np.mean([m[k] for m in window])) for k in window[-1] if k != "tokens"}
        metrics.update(learning_rate=float(learning_rate_schedule(self.config)(step - 1)),
                       tokens_per_second=tokens / (now - self._last_time), tokens=tokens)
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:,.0f}")
        self._last_time, self._window = now, []
        return metrics

    def _eval(self, step: int, writer, bar) -> dict[str, float]:
        params = self.state["params"]
        eval_metrics = evaluate(self.eval_ds, functools.partial(self.eval_step, frozen=self.frozen), params,
                                self.config.eval_batches, self.rows, self.blocks)
        # host-side evaluation (e.g. sampling), reported as eval_<name>
        eval_metrics.update({f"eval_{k}": v for k, v in self.task.extra_eval(params, self.frozen).items()})
        writer.write(step, eval_metrics)
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        return eval_metrics
