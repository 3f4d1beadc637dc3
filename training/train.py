"""The training loop every task shares: restore-or-init, jitted step with gradient accumulation,
metrics, eval, checkpoints, progress; the task supplies model, data, loss and eval.

A Task (see `training.task.Task`) provides:
  meta()                          -> JSON dict that a checkpoint must match to be resumed
  init_params(rng)                -> parameter pytree
  loss(params, batch, rng)        -> (objective summed over target tokens, metrics summed likewise);
                                     metrics must include "tokens" (the number of targets)
  train_dataset(pidx, pcount), eval_dataset() -> grain IterDatasets of dict batches
  eval_sums(params, batch)        -> {"nll": sum, "tokens": count}
  on_end(params)                  -> e.g. print a sample
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from training.checkpoint import Checkpointer
from training.data import make_iterator
from training.metrics import MetricsWriter, progress_bar
from training.optim import learning_rate_schedule, make_optimizer

REQUIRED_FIELDS = ("seed", "num_train_steps", "batch_size", "grad_accum_steps", "learning_rate", "warmup_steps",
                   "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip_norm",
                   "log_every_steps", "eval_every_steps", "save_every_steps", "keep_checkpoints", "eval_batches",
                   "dry_run", "mesh")


class ConfigFieldError(ValueError):
    """A required config field is missing."""


def check_config(config) -> None:
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ConfigFieldError(f"config lacks required fields {missing}")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigFieldError(f"config.batch_size={config.batch_size} is not divisible by "
                               f"config.grad_accum_steps={config.grad_accum_steps}")


def init_state(task, optimizer, rng):
    params = task.init_params(rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "rng": rng}


def make_train_step(task, optimizer, grad_accum_steps: int):
    def micro_grads(params, batch, rng):
        (objective, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, rng)
        return grads, {"objective": objective, **metrics}

    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        if grad_accum_steps == 1:
            grads, sums = micro_grads(state["params"], batch, rng)
        else:  # [batch, ...] -> [k, batch/k, ...], summed over the k micro-batches
            micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                g, s = micro_grads(state["params"], mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.eval_shape(micro_grads, state["params"], jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
        tokens = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)  # the token-weighted mean over the whole batch
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {k: v / tokens for k, v in sums.items() if k != "tokens"}
        metrics.update(tokens=sums["tokens"], grad_norm=optax.global_norm(grads))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics

    return train_step


def evaluate(task, eval_step, params, max_batches: int) -> dict[str, float]:
    nll = tokens = 0.0
    for i, batch in enumerate(make_iterator(task.eval_dataset())):
        if i >= max_batches:
            break
        sums = eval_step(params, batch)
        nll, tokens = nll + float(sums["nll"]), tokens + float(sums["tokens"])
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def dry_run(task, optimizer, config) -> dict[str, Any]:
    """Abstract state only (jax.eval_shape): parameter count and bytes, allocating nothing."""
    abstract = jax.eval_shape(functools.partial(init_state, task, optimizer), jax.random.PRNGKey(config.seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    report = {"params": n_params, "param_bytes": tree_bytes(abstract["params"]),
              "opt_state_bytes": tree_bytes(abstract["opt_state"])}
    print(f"dry run: {n_params:,} parameters ({n_params / 1e9:.2f}B); params {report['param_bytes'] / 2**30:.1f} GiB "
          f"+ optimizer state {report['opt_state_bytes'] / 2**30:.1f} GiB = "
          f"{(report['param_bytes'] + report['opt_state_bytes']) / 2**30:.1f} GiB")
    return report


def run(task, config, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
    """Trains `task` as `config` says, in `workdir`; returns the last logged metrics.

    stop_after: leave the loop after this step as if the process were killed there (tests use it to
    check that a resumed run reproduces the uninterrupted one); pending checkpoint writes finish.
    """
    check_config(config)
    optimizer = make_optimizer(config)
    if config.dry_run:
        return dry_run(task, optimizer, config)

    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    meta = task.meta()
    rng = jax.random.PRNGKey(config.seed)
    train_ds = task.train_dataset(jax.process_index(), jax.process_count())
    latest = ckpt.latest_step()
    if latest is None:
        state, data_state = jax.jit(functools.partial(init_state, task, optimizer))(rng), None
    else:
        ckpt.check_meta(latest, meta)
        abstract = jax.eval_shape(functools.partial(init_state, task, optimizer), rng)
        state, data_state = ckpt.restore(latest, abstract)
        print(f"resumed from {ckpt.directory} at step {latest}")
    data_iter = make_iterator(train_ds, data_state)

    train_step = jax.jit(make_train_step(task, optimizer, config.grad_accum_steps), donate_argnums=(0,))
    eval_step = jax.jit(task.eval_sums)
    schedule = learning_rate_schedule(config)
    writer = MetricsWriter(workdir)
    start = int(state["step"])
    bar = progress_bar(start, config.num_train_steps)
    last_time, window = time.perf_counter(), []
    metrics: dict[str, float] = {}
    for step in range(start + 1, config.num_train_steps + 1):
        state, step_metrics = train_step(state, next(data_iter))
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
        if step % config.eval_every_steps == 0 or step == config.num_train_steps:
            eval_metrics = evaluate(task, eval_step, state["params"], config.eval_batches)
            writer.write(step, eval_metrics)
            metrics.update(eval_metrics)
            bar.write(f"step {step}: eval loss {eval_metrics['eval_loss']:.4f}, "
                      f"perplexity {eval_metrics['eval_perplexity']:.2f}")
        if step % config.save_every_steps == 0 or step == config.num_train_steps:
            ckpt.save(step, state, data_iter.get_state(), meta)
        bar.update(1)
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    if stop_after is None or int(state["step"]) >= config.num_train_steps:
        task.on_end(state["params"])
    return metrics
