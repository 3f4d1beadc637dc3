"""Task registry: `config.task` names the function main.py runs with (config, workdir)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jamba_jax import JambaConfig, JambaForCausalLM, format_param_table, init_params


def jamba_describe(config, workdir: str) -> None:
    """Builds the model of `config.model`, prints its parameter table and runs one forward pass."""
    del workdir
    cfg = JambaConfig.from_dict(config.model.to_dict())
    print(format_param_table(cfg))
    rng = jax.random.PRNGKey(config.seed)
    params = init_params(cfg, rng)
    ids = jax.random.randint(rng, (config.batch_size, config.seq_len), 0, cfg.vocab_size)
    forward = jax.jit(lambda p, x: JambaForCausalLM(cfg).apply({"params": p}, x))
    out = forward(params, ids)
    jax.block_until_ready(out.logits)
    start = time.perf_counter()
    out = jax.block_until_ready(forward(params, ids))
    elapsed = time.perf_counter() - start
    print(f"forward pass: logits {tuple(out.logits.shape)}, aux loss {float(out.aux_loss):.4f}, "
          f"{config.batch_size * config.seq_len / elapsed:,.0f} tokens/s on {jax.devices()[0].platform}")
    assert bool(jnp.isfinite(out.logits).all()), "non-finite logits"


TASKS = {"jamba_lm": jamba_describe}


def run(config, workdir: str) -> None:
    if "task" not in config:
        raise ValueError("config has no `task` field; expected one of " + ", ".join(sorted(TASKS)))
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; expected one of {sorted(TASKS)}")
    TASKS[config.task](config, workdir)
