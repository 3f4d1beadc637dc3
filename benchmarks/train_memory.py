"""Memory of one training step against sequence length (issue 16): XLA's own accounting of the compiled
step (temporaries, arguments, outputs) for the tiny config at batch 1 with remat, abstract state (no
data, nothing run). Linear growth means no [length, length] array; the slope is the bytes per token.

  python -m benchmarks.train_memory [--lengths 2048 8192 32768]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from configs import jamba_tiny
from tasks.jamba_lm import JambaLMTask
from training.optim import make_optimizer
from training.step import init_state, make_train_step

MIB = 2**20


def step_memory(length: int) -> dict:
    config = jamba_tiny.get_config()
    config.dry_run, config.model.remat, config.seq_len, config.batch_size = True, True, length, 1
    task = JambaLMTask(config)
    optimizer = make_optimizer(config)
    state = jax.eval_shape(lambda r: init_state(task, optimizer, r), jax.random.PRNGKey(0))
    batch = {k: jax.ShapeDtypeStruct((1, length), jnp.int32) for k in ("inputs", "segment_ids")}
    m = jax.jit(make_train_step(task, optimizer, 1)).lower(state, batch).compile().memory_analysis()
    return {"length": length, "temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
            "outputs": m.output_size_in_bytes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    args = ap.parse_args(argv)
    rows = [step_memory(n) for n in args.lengths]
    print("| tokens | XLA temporaries MiB | KiB per token | arguments MiB |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['length']} | {r['temp'] / MIB:,.0f} | {r['temp'] / r['length'] / 1024:,.0f} | "
              f"{r['arguments'] / MIB:,.0f} |")


if __name__ == "__main__":
    main()
