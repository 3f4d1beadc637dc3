"""The train state and the jitted update every task shares: token-weighted gradients (with
micro-batch accumulation), then the optimizer. Needs only jax and optax, so accelerator scripts
use it without the data stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def state_from_params(optimizer, params, rng):
    """A fresh train state (step 0, the optimizer's initial state) around `params`."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "rng": rng}


def init_state(task, optimizer, rng):
    return state_from_params(optimizer, task.init_params(rng), rng)


def per_count(sums: dict, maximum=jnp.maximum) -> dict:
    """Each sum k divided by its count "k_n" if there is one, else by "tokens" (the counts left out; a
    count below 1 counts as 1). `maximum`: jnp's on arrays, Python's `max` on host floats."""
    tokens = maximum(sums["tokens"], 1.0)
    return {k: v / (maximum(sums[f"{k}_n"], 1.0) if f"{k}_n" in sums else tokens)
            for k, v in sums.items() if k != "tokens" and not k.endswith("_n")}


def make_train_step(task, optimizer, grad_accum_steps: int):
    """train_step(state, batch, frozen=None) -> (new state, metrics). Gradients are taken of the
    parameters alone: `frozen` (the task's frozen inputs) is data to the loss."""

    def micro_grads(params, batch, rng, frozen):
        (objective, sums), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, rng, frozen)
        return grads, {"objective": objective, **sums}

    def train_step(state, batch, frozen=None):
        rng = jax.random.fold_in(state["rng"], state["step"])
        if grad_accum_steps == 1:
            grads, sums = micro_grads(state["params"], batch, rng, frozen)
        else:  # [batch, ...] -> [k, batch/k, ...], summed over the k micro-batches
            micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                g, s = micro_grads(state["params"], mb, jax.random.fold_in(rng, i), frozen)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.eval_shape(micro_grads, state["params"], jax.tree.map(lambda x: x[0], micro), rng, frozen)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
        tokens = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)  # the token-weighted mean over the whole batch
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = per_count(sums)
        metrics.update(tokens=sums["tokens"], grad_norm=optax.global_norm(grads))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics

    return train_step
