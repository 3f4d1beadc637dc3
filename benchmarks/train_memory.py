"""Memory (and speed) of one training step, from XLA's own accounting of the compiled step (temporaries,
arguments, outputs; abstract state, nothing run) unless timed:

  python -m benchmarks.train_memory --lengths 2048 8192 32768
      the tiny config at batch 1 with remat_policy="full", against sequence length (issue 16): linear
      growth means no [length, length] array; the slope is the bytes per token;
  python -m benchmarks.train_memory --policies
      each `remat_policy` (jamba_jax.remat) on the 11.6M benchmark model (`benchmarks.long_context.bench_cfg`)
      in both layer layouts: the step's temporaries and its time (median of real steps on random tokens, the
      same process); writes the `remat_policies` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine, time_fn, write_section
from configs import jamba_tiny
from jamba_jax.config import REMAT_POLICIES
from tasks.jamba_lm import JambaLMTask
from training.optim import make_optimizer
from training.step import init_state, make_train_step

MIB = 2**20


def _task(length: int, batch: int, **model):
    config = jamba_tiny.get_config()
    config.dry_run, config.seq_len, config.batch_size = True, length, batch
    for k, v in model.items():
        config.model[k] = v
    task = JambaLMTask(config)
    return task, make_optimizer(config)


def step_memory(length: int, batch: int = 1, **model) -> dict:
    task, optimizer = _task(length, batch, **model)
    state = jax.eval_shape(lambda r: init_state(task, optimizer, r), jax.random.PRNGKey(0))
    tokens = {k: jax.ShapeDtypeStruct((batch, length), jnp.int32) for k in ("inputs", "segment_ids")}
    m = jax.jit(make_train_step(task, optimizer, 1)).lower(state, tokens).compile().memory_analysis()
    return {"length": length, "temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
            "outputs": m.output_size_in_bytes}


def step_time(length: int, batch: int, repeats: int, **model) -> dict:
    """(seconds per step, compile seconds) of real steps on random tokens, one packed document per row."""
    task, optimizer = _task(length, batch, **model)
    state = jax.jit(lambda r: init_state(task, optimizer, r))(jax.random.PRNGKey(0))
    ids = np.random.RandomState(0).randint(3, task.cfg.vocab_size, (batch, length)).astype(np.int32)
    batch_arrays = {"inputs": jnp.asarray(ids), "segment_ids": jnp.ones_like(jnp.asarray(ids))}
    start = time.perf_counter()
    step = jax.jit(make_train_step(task, optimizer, 1), donate_argnums=(0,)).lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch_arrays)
        jax.block_until_ready(metrics["loss"])

    return {"seconds": time_fn(one, warmup=1, repeats=repeats), "compile": compile_s}


def saved_residual_bytes(length: int, batch: int, **model) -> int:
    """Bytes of what the step's backward pass keeps from its forward pass, as jax's autodiff sees it (before
    XLA schedules anything): what a remat policy decides."""
    from jax._src.ad_checkpoint import saved_residuals

    task, _ = _task(length, batch, **model)
    params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    tokens = {k: jnp.zeros((batch, length), jnp.int32) for k in ("inputs", "segment_ids")}
    res = saved_residuals(lambda p: task.loss(p, tokens, None, None)[0], params)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, src in res if "from the argument" not in src)


READING = """
Reading the table: the policies keep what they say at jax's level (saved), and under `scan_layers` XLA's
buffers follow them. In the unrolled stack XLA:CPU's temporaries stay those of `none`: nothing orders a
layer's recomputation after the backward pass has reached that layer, and XLA:CPU's scheduler evidently
runs the recomputations early, so the activations are all live at once again; in the scanned stack the loop
over the repeats orders them. Hence the pod configs scan their layers. `save_attention_and_moe_outputs`
keeps the attention's output and log-sum-exp and the experts' hidden activations, so the backward pass
skips the attention loop and the experts' first matmuls; `save_dots` keeps every projection's output. On
this CPU, where a step's time follows its memory traffic, keeping costs more than recomputing: `full` is
both the smallest and the fastest of the scanned rows; the other policies trade memory for recomputation
that costs more on an accelerator (not measured here: BENCHMARKS `accelerator` has no device run yet)."""
POLICY_ROWS = [(False, "none"), (False, "full")] + [(True, p) for p in REMAT_POLICIES]


def policies(length: int, batch: int, repeats: int, layers: int) -> str:
    from benchmarks.long_context import bench_cfg

    cfg = bench_cfg()
    model = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "tie_word_embeddings")}
    model["num_hidden_layers"] = layers
    rows = []
    for scan, policy in POLICY_ROWS:
        fields = dict(model, remat_policy=policy, scan_layers=scan)
        saved = saved_residual_bytes(length, batch, **fields)
        mem, t = step_memory(length, batch, **fields), step_time(length, batch, repeats, **fields)
        rows.append((policy, scan, saved, mem["temp"], t["seconds"], t["compile"]))
        print(rows[-1], flush=True)
    base = {scan: next(r for r in rows if r[0] == "none" and r[1] == scan) for scan in (False, True)}
    table = [f"| {p} | {'scanned' if s else 'unrolled'} | {saved / MIB:,.0f} | {temp / MIB:,.0f} | "
             f"{temp / base[s][3]:.2f} | {sec:.2f} | {sec / base[s][4]:.2f} | {comp:.0f} |"
             for p, s, saved, temp, sec, comp in rows]
    return "\n".join([
        "## Remat policies: memory and speed of a training step (issue 27)", "",
        f"Command: `python -m benchmarks.train_memory --policies --policy_length {length} --policy_batch {batch} "
        f"--policy_layers {layers}`",
        f"Machine: {machine()}, jax {jax.__version__}. Model: the benchmark model's width "
        f"(`benchmarks.long_context.bench_cfg`: the tiny config at hidden 256, float32) at {layers} layers "
        f"({layers // 8} repeats of the 8-layer cycle), AdamW, {batch} x {length} tokens per step. Saved: what "
        "the backward pass keeps from the forward pass as jax's autodiff sees it (the parameters aside): what "
        "the policy decides. XLA temporaries: XLA:CPU's buffer accounting of the compiled step. Time: median of "
        f"{repeats} steps after one warm-up, in this process.", "",
        "| remat_policy | layers | saved MiB | XLA temporaries MiB | vs none | seconds per step | vs none | "
        "compile s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |", *table, READING])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--policies", action="store_true", help="compare the remat policies instead")
    ap.add_argument("--policy_length", type=int, default=2048)
    ap.add_argument("--policy_batch", type=int, default=1)
    ap.add_argument("--policy_layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.policies:
        body = policies(args.policy_length, args.policy_batch, args.repeats, args.policy_layers)
        print(body)
        write_section("remat_policies", body)
        return
    rows = [step_memory(n, remat_policy="full") for n in args.lengths]
    print("| tokens | XLA temporaries MiB | KiB per token | arguments MiB |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['length']} | {r['temp'] / MIB:,.0f} | {r['temp'] / r['length'] / 1024:,.0f} | "
              f"{r['arguments'] / MIB:,.0f} |")


if __name__ == "__main__":
    main()
