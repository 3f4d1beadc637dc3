"""Selective-scan implementations side by side, with transformers' PyTorch slow path as the peer.

Each measurement runs in a fresh subprocess so that its peak RSS is its own.

  python -m benchmarks.selective_scan [--lengths 2048 16384] [--impls scan chunked associative]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

B, D, N = 2, 1024, 16


def _inputs(length):
    import numpy as np

    r = np.random.RandomState(0)
    f = lambda *s: r.randn(*s).astype(np.float32)  # noqa: E731
    return dict(u=f(B, length, D), delta=0.5 * f(B, length, D), A=-np.exp(0.5 * f(D, N)), B=f(B, length, N),
                C=f(B, length, N), D=f(D), z=f(B, length, D), bias=f(D))


def _run_jax(impl, length, mode, repeats):
    import jax
    import jax.numpy as jnp

    from kernels import selective_scan

    x = {k: jnp.asarray(v) for k, v in _inputs(length).items()}

    def fwd(u, delta, A, B_, C):
        return selective_scan(u, delta, A, B_, C, D=x["D"], z=x["z"], delta_bias=x["bias"], delta_softplus=True,
                              impl=impl)

    if mode == "fwd":
        fn = jax.jit(fwd)
    else:
        fn = jax.jit(jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2, 3, 4)))
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    temp_mb = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times), temp_mb


def _run_torch(length, mode, repeats):
    import torch
    from transformers.models.jamba.modeling_jamba import mamba_selective_scan

    x = {k: torch.tensor(v) for k, v in _inputs(length).items()}
    tr = lambda a: a.transpose(1, 2).contiguous()  # noqa: E731  our [b, L, d] -> mamba's [b, d, L]
    u, delta, B_, C, z = tr(x["u"]), tr(x["delta"]), tr(x["B"]), tr(x["C"]), tr(x["z"])
    times = []
    for _ in range(repeats):
        args = [a.clone().requires_grad_(mode == "fwd_bwd") for a in (u, delta, x["A"], B_, C)]
        t = time.perf_counter()
        with torch.set_grad_enabled(mode == "fwd_bwd"):
            y = mamba_selective_scan(*args, D=x["D"], z=z, delta_bias=x["bias"], delta_softplus=True)
            if mode == "fwd_bwd":
                y.sum().backward()
        times.append(time.perf_counter() - t)
    return min(times), None


def _child(impl, length, mode, repeats):
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    secs, temp_mb = _run_torch(length, mode, repeats) if impl == "torch" else _run_jax(impl, length, mode, repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": secs, "peak_mb": peak_mb, "xla_temp_mb": temp_mb}))


def measure(impl, length, mode, repeats):
    cmd = [sys.executable, "-m", "benchmarks.selective_scan", "--child", impl, str(length), mode, str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--impls", nargs="+", default=["scan", "chunked", "associative", "torch"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, length, mode, repeats = args.child
        return _child(impl, int(length), mode, int(repeats))

    from benchmarks.common import machine, write_section

    rows = []
    for length in args.lengths:
        full_mb = B * length * D * N * 4 / 2**20
        results = {}
        for impl in args.impls:
            if impl == "associative" and length > 4096:
                continue  # materialises several [b, L, d, n] tensors: ~2 GiB each at 16K
            for mode in ("fwd", "fwd_bwd"):
                if impl == "torch" and mode == "fwd_bwd" and length > 2048:
                    continue  # minutes per step-slice backward at 2K; hours at 16K
                repeats = 1 if impl == "torch" else args.repeats  # torch fwd_bwd takes minutes
                results[impl, mode] = r = measure(impl, length, mode, repeats)
                print(length, impl, mode, r, flush=True)
        for (impl, mode), r in results.items():
            peer = results.get(("torch", mode), {}).get("seconds")
            ratio = f"{peer / r['seconds']:.1f}x" if peer and "seconds" in r else "-"
            cell = f"{r['seconds']:.3f}" if "seconds" in r else r["error"]
            peak = f"{r['peak_mb']:,.0f}" if "peak_mb" in r else "-"
            temp = f"{r['xla_temp_mb']:,.0f}" if r.get("xla_temp_mb") is not None else "-"
            rows.append(f"| {length} | {impl} | {mode} | {cell} | {peak} | {temp} | {ratio} | {full_mb:,.0f} |")
    body = f"""## Selective scan on CPU (issue: selective-scan kernels)

Command: `python -m benchmarks.selective_scan --lengths {' '.join(map(str, args.lengths))}`
Machine: {machine()}. Shapes: batch {B}, d_inner {D}, d_state {N}, float32, with D, z, delta_bias and softplus.
Seconds: best of {args.repeats} after a warm-up (torch: a single run, its backward takes minutes); each in its
own process, peak RSS of that process (includes the Python runtime and the inputs). `torch` is
transformers' `mamba_selective_scan` slow path (what JambaForCausalLM runs on CPU); its backward allocates a full [b,d,L,n] gradient per time step,
so it is measured at 2K only. Ratio: torch time / this time, same mode.
`pallas` is left out here: on CPU it runs in interpret mode, a correctness tool, not a fast path.
XLA temp MB: the compiled program's scratch memory (`memory_analysis().temp_size_in_bytes`), beside
the size of one [b, L, d, n] float32 tensor: the fused scan's scratch stays far below it.

| length | impl | mode | seconds | peak RSS MB | XLA temp MB | speed-up vs torch | one [b,L,d,n] f32 tensor MB |
| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |
""" + "\n".join(rows) + "\n"
    print(body)
    write_section("selective_scan", body)


if __name__ == "__main__":
    main()
