"""Long-context figures for an 11.6M-parameter Jamba (issue 16): prefill with the default arguments and decode
from a long cache, each against a limit measured in the same process.

Prefill: one prompt of L random tokens through `jamba_jax.prefill` with its defaults (chunk from
the activation budget, blockwise attention), each length in a fresh process: seconds, peak RSS and
the fraction of this CPU's matmul peak (a 2048^3 float32 `jnp.dot`, same process) that the useful
FLOPs reach: 2 x active non-embedding parameters per token plus causal attention (4 x heads x
head_dim x L^2 / 2 per attention layer).
Decode: 64 greedy tokens (one compiled loop) after a prompt of C tokens; the bound is the bytes a
step must read (weights + the KV cache + Mamba states) over the in-place copy bandwidth of a 256 MiB array
(`benchmarks.common.copy_bandwidth`).

  python -m benchmarks.long_context [--lengths 8192 32768 131072 262144] [--decode_context 131072]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jamba_jax
from benchmarks.common import copy_bandwidth, machine, model_config, time_fn, write_section
from jamba_jax.generation import decode_loop, default_prefill_chunk

DECODE_TOKENS = 64
SHORT_CONTEXT = 256  # the decode step with next to no cache: weights and per-step overheads


def bench_cfg():
    """The issue's 11.6M model: the tiny config widened to hidden 256 (8 heads / 2 KV heads, MLP 512,
    tied embeddings; `benchmarks.common.MODEL_OVERRIDES["bench"]`); 8 layers, attention at layer 4, 4 experts
    top-2 at odd layers."""
    return jamba_jax.JambaConfig.from_dict(model_config("bench").model.to_dict())


def matmul_peak(n: int = 2048) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    fn = jax.jit(jnp.dot)
    return 2 * n**3 / time_fn(lambda: jax.block_until_ready(fn(a, b)), repeats=5)


def prefill_flops(cfg, length: int) -> float:
    counts = jamba_jax.count_params(cfg)
    dense = counts["active"] - counts["by_kind"].get("embedding", 0)
    n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.num_hidden_layers))
    attn = n_attn * 4 * cfg.num_attention_heads * cfg.head_dim * length * length / 2
    return 2 * dense * length + attn


def _child(length: int, decode: bool) -> dict:
    cfg = bench_cfg()
    model = jamba_jax.JambaForCausalLM(cfg)
    params = jamba_jax.init_params(cfg, jax.random.PRNGKey(0))
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (1, length)).astype(np.int32)
    chunk = default_prefill_chunk(cfg, 1, length)
    max_length = length + (DECODE_TOKENS if decode else 0)
    jamba_jax.prefill(model, params, ids[:, :chunk], max_length=max_length)  # compiles the chunk step
    peak = matmul_peak()
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(jamba_jax.prefill(model, params, ids, max_length=max_length))
    seconds = time.perf_counter() - start
    out = {"length": length, "chunk": chunk, "seconds": seconds, "flops": prefill_flops(cfg, length),
           "matmul_peak": peak, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "cache_bytes": jamba_jax.cache_bytes(cfg, 1, max_length, "float32")["total"]}
    if decode:
        short_logits, short_cache = jamba_jax.prefill(model, params, ids[:, :SHORT_CONTEXT],
                                                      max_length=SHORT_CONTEXT + DECODE_TOKENS)
        out["decode"] = [_decode_figures(model, params, short_logits, short_cache, SHORT_CONTEXT),
                         _decode_figures(model, params, logits, cache, length)]
    return out


def _decode_figures(model, params, logits, cache, context: int) -> dict:
    """Seconds per greedy token of the compiled decode loop from `cache`, and its bound: the bytes a step reads
    (float32 active weights + KV cache + Mamba states) over the in-place copy bandwidth measured just before."""
    cfg = model.cfg
    bw = copy_bandwidth(256 * 2**20)
    done = jnp.zeros((1,), bool)
    run = lambda: jax.block_until_ready(decode_loop(  # noqa: E731
        model, params, jax.tree.map(jnp.copy, cache), logits, done, jax.random.PRNGKey(0), DECODE_TOKENS,
        0.0, None, None, None, 0))
    copy_s = time_fn(lambda: jax.block_until_ready(jax.tree.map(jnp.copy, cache)), repeats=3)
    step_s = (time_fn(run, repeats=3) - copy_s) / DECODE_TOKENS
    weights = jamba_jax.count_params(cfg)["active"] * 4
    cache_bytes = jamba_jax.cache_bytes(cfg, 1, context + DECODE_TOKENS, "float32")["total"]
    return {"context": context, "step_s": step_s, "bandwidth": bw, "bytes_per_step": weights + cache_bytes}


def run_child(length: int, decode: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.long_context", "--child", str(length)] + (["--decode"] if decode else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    if proc.returncode != 0:
        raise RuntimeError(f"child {length} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(prefills: list[dict], decode: dict | None, args) -> str:
    mib = 2**20
    lines = ["## Long context: prefill and decode, 11.6M Jamba on CPU (issue 16)", "",
             f"Command: `python -m benchmarks.long_context --lengths {' '.join(map(str, args.lengths))} "
             f"--decode_context {args.decode_context}`",
             f"Machine: {machine()}; jax {jax.__version__}; `bench_cfg()`: the tiny config at hidden 256 "
             f"({jamba_jax.count_params(bench_cfg())['total'] / 1e6:.1f}M parameters, float32, random weights), "
             "batch 1, each length in a fresh process.", "",
             "Prefill with `jamba_jax.prefill`'s defaults (chunk from the 256 MiB activation budget, blockwise "
             "attention). Peak: a 2048^3 float32 `jnp.dot` timed in the same process; useful FLOPs: "
             "2 x active non-embedding parameters per token + causal attention.", "",
             "| tokens | chunk | seconds | tokens/s | peak RSS MiB | cache MiB | TFLOP | GFLOP/s | matmul peak GFLOP/s "
             "| fraction of peak |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in prefills:
        rate = r["flops"] / r["seconds"]
        lines.append(f"| {r['length']} | {r['chunk']} | {r['seconds']:.2f} | {r['length'] / r['seconds']:,.0f} | "
                     f"{r['peak_rss'] / mib:,.0f} | {r['cache_bytes'] / mib:.1f} | {r['flops'] / 1e12:.2f} | "
                     f"{rate / 1e9:.1f} | {r['matmul_peak'] / 1e9:.1f} | {rate / r['matmul_peak']:.2f} |")
    if len(prefills) > 1:
        a, b = prefills[-2], prefills[-1]
        lines += ["", f"time({b['length']}) / time({a['length']}) = {b['seconds'] / a['seconds']:.2f} "
                  f"(tokens x{b['length'] / a['length']:.0f}; useful FLOPs x{b['flops'] / a['flops']:.2f})."]
    lines += ["", "(The `generation` section's prefill rows were measured before this attention path, with "
              "`prefill_chunk=2048` passed by hand and the tiny config.)"]
    if decode:
        lines += ["", f"Decode: {DECODE_TOKENS} greedy tokens after a prompt of `context` tokens, one compiled loop "
                  "(minus the cache copy each timed call makes), in the process of the longest prefill. Bound: bytes "
                  "a step reads (float32 active weights + KV cache + Mamba states) / in-place copy bandwidth of a "
                  "256 MiB array (`benchmarks.common.copy_bandwidth`), measured just before.", "",
                  "| context | ms/token | tokens/s | bytes/step MiB | copy GB/s | bound ms/token | fraction of bound |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for d in decode["decode"]:
            bound = d["bytes_per_step"] / d["bandwidth"]
            lines.append(f"| {d['context']} | {d['step_s'] * 1e3:.2f} | {1 / d['step_s']:,.0f} | "
                         f"{d['bytes_per_step'] / mib:.1f} | {d['bandwidth'] / 1e9:.1f} | {bound * 1e3:.2f} | "
                         f"{bound / d['step_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 262144])
    ap.add_argument("--decode_context", type=int, default=131072, help="0: no decode figure")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no_write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    ap.add_argument("--note", default="", help="a line added to the section (how the run was made)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.decode)))
        return
    prefills = []
    for length in args.lengths:
        prefills.append(run_child(length, False))
        print(json.dumps(prefills[-1]), flush=True)
    decode = run_child(args.decode_context, True) if args.decode_context else None
    if decode:
        print(json.dumps(decode), flush=True)
    text = report(prefills, decode, args) + (f"\n\n{args.note}" if args.note else "")
    print(text)
    if not args.no_write:
        write_section("long_context", text)


if __name__ == "__main__":
    main()
