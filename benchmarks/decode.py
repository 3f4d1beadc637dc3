"""Decoding from a long cache against the memory bandwidth bound, per KV cache dtype (issue 32).

  python -m benchmarks.decode [--context 131072 --batch 1 --dtypes float32 bfloat16 int8]

The 11.6M benchmark model (float32 weights), batch 1 by default (`measure` takes any config, weights and batch:
`benchmarks.accelerator` runs it for a 1B model on a device). The cache is filled directly (random keys and values
of unit scale at every position before `context`, random Mamba states), not by a prefill: a step's time depends on
how many positions it reads, not on what they hold, and a 128K prefill takes minutes. For each
`config.kv_cache_dtype` the same keys and values are written into a cache of that dtype, and:

- ms per token of `jamba_jax.generation.decode_loop` (64 greedy tokens in one compiled loop, minus the copy of
  the cache each timed call makes), from `context` and from SHORT_CONTEXT (the step's non-attention floor:
  weights, Mamba steps, router, small mat-vecs, per-op overheads);
- the bound: the bytes a step reads (float32 active weights + the KV cache in its dtype, int8 with its scales,
  + the Mamba states) over the in-place copy bandwidth of a 256 MiB array measured in the same process;
- the first step's logits against the float32 cache's (max |difference| / their standard deviation).

Writes the `decode` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

import jamba_jax
from benchmarks.common import copy_bandwidth, machine, time_fn, write_section
from benchmarks.long_context import bench_cfg
from common.attention import kv_store
from jamba_jax.generation import decode_loop
from jamba_jax.layers import KVCache
from jamba_jax.mamba import MambaCache

DECODE_TOKENS = 64
SHORT_CONTEXT = 256


@functools.partial(jax.jit, static_argnames=("cfg", "context", "dtype", "batch", "seed"))
def filled_cache(cfg, context: int, dtype: str | None, batch: int = 1, seed: int = 0):
    """A cache of `batch` rows and context + DECODE_TOKENS slots, the first `context` real: random unit-scale keys
    and values drawn on the device (the same numbers for every dtype) and written in `dtype`, random Mamba states."""
    cache = jamba_jax.init_cache(cfg, batch, context + DECODE_TOKENS, dtype)
    keys = (jax.random.fold_in(jax.random.PRNGKey(seed), i) for i in itertools.count())  # one per array filled

    def fill(c):
        if isinstance(c, KVCache):
            shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
            k, v = (jax.random.normal(next(keys), shape, jnp.float32) for _ in range(2))
            return KVCache(kv_store.write(c.k, k, 0), kv_store.write(c.v, v, 0))
        return MambaCache(*(0.1 * jax.random.normal(next(keys), x.shape, jnp.float32).astype(x.dtype) for x in c))

    valid = jnp.zeros_like(cache.valid).at[:, :context].set(True)
    return cache.replace(index=jnp.asarray(context, jnp.int32), valid=valid, layers=tuple(map(fill, cache.layers)))


def step_seconds(model, params, cache) -> float:
    """Seconds per step of `decode_loop` over DECODE_TOKENS greedy tokens from `cache` (every row decoding), less
    the copy of the cache each timed call makes (the loop donates it)."""
    batch = cache.valid.shape[0]
    logits = jnp.zeros((batch, model.cfg.vocab_size), jnp.float32)
    done = jnp.zeros((batch,), bool)
    run = lambda: jax.block_until_ready(decode_loop(  # noqa: E731
        model, params, jax.tree.map(jnp.copy, cache), logits, done, jax.random.PRNGKey(0), DECODE_TOKENS,
        0.0, None, None, None, 0))
    copy_s = time_fn(lambda: jax.block_until_ready(jax.tree.map(jnp.copy, cache)), repeats=3)
    return (time_fn(run, repeats=3) - copy_s) / DECODE_TOKENS


def measure(context: int, dtypes: list[str], cfg=None, params=None, batch: int = 1, bandwidth: float | None = None,
            contexts=None) -> dict:
    """Rows {dtype, context, step_s, bytes, bandwidth} for each KV dtype and context (default: SHORT_CONTEXT and
    `context`), and each dtype's first-step logits error at `context` against float32's. Defaults: the 11.6M
    benchmark model, float32 weights; bandwidth: the in-place copy of 256 MiB, measured here."""
    cfg = cfg or bench_cfg()
    params = params if params is not None else jamba_jax.init_params(cfg, jax.random.PRNGKey(0))
    itemsize = np.dtype(jax.tree.leaves(params)[0].dtype).itemsize
    weights = jamba_jax.count_params(cfg)["active"] * itemsize
    token = jnp.full((batch,), 5, jnp.int32)
    rows, first_logits = [], {}
    bw = bandwidth or copy_bandwidth(256 * 2**20)
    for dtype in dtypes:
        model = jamba_jax.JambaForCausalLM(cfg.replace(kv_cache_dtype=dtype))
        for ctx in contexts or (SHORT_CONTEXT, context):
            cache = filled_cache(cfg, ctx, dtype, batch)
            if ctx == context:
                logits = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method="decode").logits)(  # noqa: B023
                    params, token, cache)
                first_logits[dtype] = np.asarray(logits, np.float32)
            nbytes = weights + jamba_jax.cache_bytes(cfg, batch, ctx + DECODE_TOKENS, dtype)["total"]
            rows.append({"dtype": dtype, "context": ctx, "batch": batch, "step_s": step_seconds(model, params, cache),
                         "bytes": nbytes, "bandwidth": bw})
            print(rows[-1], flush=True)
            del cache
    ref = first_logits.get("float32")
    errors = {d: float(np.abs(x - ref).max() / ref.std()) for d, x in first_logits.items()} if ref is not None else {}
    return {"rows": rows, "errors": errors, "context": context}


def table(result: dict) -> list[str]:
    """The rows as a markdown table: ms per token, the bound, its fraction, speed against the float32 cache (and
    the most the bytes allow: float32's bound over this dtype's), logits error."""
    mib = 2**20
    f32 = {r["context"]: r for r in result["rows"] if r["dtype"] == "float32"}
    lines = ["| KV dtype | context | ms/token | bytes/step MiB | copy GB/s | bound ms | fraction of bound "
             "| speed vs float32 | bound vs float32's | logits error |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        bound = r["bytes"] / r["bandwidth"]
        ref = f32.get(r["context"])
        speed = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
        most = f"{ref['bytes'] / r['bytes']:.2f}x" if ref else "-"
        err = f"{result['errors'].get(r['dtype'], 0):.1e}" if r["context"] == result["context"] else ""
        lines.append(f"| {r['dtype']} | {r['context']} | {r['step_s'] * 1e3:.2f} | {r['bytes'] / mib:.1f} | "
                     f"{r['bandwidth'] / 1e9:.1f} | {bound * 1e3:.2f} | {bound / r['step_s']:.2f} | {speed} | {most} "
                     f"| {err} |")
    return lines


def report(result: dict, args) -> str:
    return "\n".join(
        ["## Decode from a long cache: time per token against the bandwidth bound, per KV cache dtype (issue 32)", "",
         f"Command: `python -m benchmarks.decode --context {args.context} --batch {args.batch} --dtypes "
         f"{' '.join(args.dtypes)}` ({machine()}; jax {jax.__version__}). The 11.6M benchmark model, float32 weights, "
         f"batch {args.batch}, the cache filled directly (random unit-scale keys and values, module docstring); "
         f"{DECODE_TOKENS} greedy tokens in one compiled loop. Bound: bytes a step reads / in-place copy bandwidth of "
         "a 256 MiB array, same process; the weights are read once a step whatever the cache's dtype, so a "
         "dtype's speed over float32 can reach at most float32's bound over its own (`bound vs float32's`). Logits "
         "error: the first step's max |difference| from the float32 cache's logits over their standard deviation.",
         ""] + table(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=list(kv_store.KV_CACHE_DTYPES), choices=kv_store.KV_CACHE_DTYPES)
    ap.add_argument("--no_write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args(argv)
    text = report(measure(args.context, args.dtypes, batch=args.batch), args)
    print(text)
    if not args.no_write:
        write_section("decode", text)


if __name__ == "__main__":
    main()
