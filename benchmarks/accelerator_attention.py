"""The flash-attention part of the accelerator script (`benchmarks.accelerator`): the compiled
kernel checked against the materialised reference, and timed against the blockwise XLA path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import time_fn
from common.attention import AttentionMask, attention, reference_attention


def _attention_inputs(b, length, keys, nkv, g, d, dtype, seed=0):
    r = np.random.RandomState(seed)
    return (jnp.asarray(r.randn(b, length, nkv, g, d), dtype), jnp.asarray(r.randn(b, nkv, keys, d), dtype),
            jnp.asarray(r.randn(b, nkv, keys, d), dtype))


def check_attention(small: bool) -> list[dict]:
    """Compiled (interpreted on CPU) flash-attention forward kernel vs the materialised reference: output and,
    through the blockwise backward it feeds, dq / dk / dv; causal with left padding, packed, cached."""
    rows = []
    length = 70 if small else 1000
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = _attention_inputs(2, length, length, 2, 4, 64, dtype, seed=2)
        valid = jnp.ones((2, length), bool).at[1, :17].set(False)
        segments = jnp.where(jnp.arange(length) < length // 3, 1, 2)[None].repeat(2, 0).astype(jnp.int32)
        masks = {"causal": AttentionMask.causal(valid), "packed": AttentionMask.causal(jnp.ones((2, length), bool),
                                                                                        segments)}
        for name, mask in masks.items():
            defined = np.asarray(jnp.any(mask.dense(length), axis=-1))  # rows with a visible key
            outs = {}
            for impl in ("pallas", "reference"):
                fn = (lambda q, k, v, m: attention(q, k, v, m, "pallas")) if impl == "pallas" else reference_attention
                out = jax.jit(fn)(q, k, v, mask)
                weight = jnp.asarray(defined, jnp.float32)[:, :, None, None, None]
                grads = jax.jit(jax.grad(lambda q, k, v, m, fn=fn, w=weight: jnp.sum(
                    fn(q, k, v, m).astype(jnp.float32) * w), argnums=(0, 1, 2)))(q, k, v, mask)
                outs[impl] = [np.asarray(out, np.float32)[defined]] + [np.asarray(x, np.float32) for x in grads]
            tol = 1e-4 if dtype == jnp.float32 else 2e-2
            for label, got, want in zip(("y", "dq", "dk", "dv"), outs["pallas"], outs["reference"], strict=True):
                err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
                rows.append(dict(kernel=f"flash_attention {name}", shape=f"2x{length}x2x4x64",
                                 dtype=jnp.dtype(dtype).name, reset=False, output=label, rel_err=err, ok=err <= tol))
    return rows


def attention_speed(small: bool, peak: float) -> list[dict]:
    """A prefill chunk into a long cache (Jamba-1.5-Mini's heads: 8 kv x 4, head dim 128, bf16): the Pallas
    kernel vs the blockwise XLA path; TFLOP/s counts the visible (causal) half of q k^T and p v."""
    chunk, caches = (64, (256,)) if small else (2048, (32768, 131072))
    rows = []
    for keys in caches:
        q, k, v = _attention_inputs(1, chunk, keys, 8, 4, 128, jnp.bfloat16)
        mask = AttentionMask.cached(jnp.ones((1, keys), bool), jnp.int32(keys - chunk), chunk)
        flops = 4 * chunk * 32 * 128 * (keys - chunk / 2)
        for impl in ("pallas", "blockwise"):
            fn = jax.jit(lambda q, k, v, m, impl=impl: attention(q, k, v, m, impl))
            t = time_fn(lambda fn=fn, args=(q, k, v, mask): jax.block_until_ready(fn(*args)), repeats=3)
            rows.append(dict(keys=keys, chunk=chunk, impl=impl, seconds=t, tflops=flops / t / 1e12,
                             frac_peak=flops / t / peak))
            print(f"  attention {impl:9s} {chunk} of {keys}: {t * 1e3:9.2f} ms", flush=True)
    return rows


def attention_report(rows: list[dict] | None) -> list[str]:
    """The BENCHMARKS lines for attention_speed's rows (none when it did not run)."""
    if not rows:
        return []
    lines = ["Flash attention, one prefill chunk into a cache (Jamba-1.5-Mini's heads: 8 kv heads x 4, head dim "
              "128, bf16); FLOPs: the visible (causal) part of q k^T and p v.", "",
              "| chunk | cache | impl | ms | TFLOP/s | of matmul peak |", "| ---: | ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['chunk']} | {r['keys']} | {r['impl']} | {r['seconds'] * 1e3:.2f} | {r['tflops']:.1f} | "
              f"{r['frac_peak']:.1%} |" for r in rows]
    lines.append("")
    return lines
