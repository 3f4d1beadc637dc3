"""The kernel part of the accelerator script (`benchmarks.accelerator`): the Pallas selective scan and
int8_matmul checked against their jnp references, compiled, and timed (the scan's bytes against the
device's measured bandwidth, the int8 matmul against a bf16 matmul)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import time_fn
from kernels import int8_matmul, selective_scan
from kernels.int8_matmul import int8_matmul_reference


def timed(fn, *args, repeats=5, warmup=1):
    """Median seconds of fn(*args) (blocked until ready) after `warmup` calls."""
    return time_fn(lambda: jax.block_until_ready(fn(*args)), warmup=warmup, repeats=repeats)


def nbytes(*arrays) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(arrays))


def tpu_vmem_report() -> str:
    """VMEM one program of the TPU scan kernels asks for at Jamba-1.5's d_inner (arithmetic, any host)."""
    from kernels import ssm_pallas_tpu as tpu

    parts = []
    for name, d in (("Mini", 8192), ("Large", 16384)):
        chunk, fwd_tile, bwd_tile, n = tpu.plan(262144, d, 16)
        parts.append(f"{name} (d_inner {d}) forward {tpu.vmem_bytes(d, n, chunk, fwd_tile, False) / 2**20:.1f} MiB, "
                     f"backward {tpu.vmem_bytes(d, n, chunk, bwd_tile, True) / 2**20:.1f} MiB")
    return "; ".join(parts) + f" (budget {tpu.VMEM_BUDGET / 2**20:.0f} MiB)"


# ------------------------------------------------------------------------------------------------
# selective scan
# ------------------------------------------------------------------------------------------------
def scan_inputs(b, length, d, n, dtype, seed=0, reset=False):
    r = np.random.RandomState(seed)
    f = lambda *s: r.randn(*s).astype(np.float32)  # noqa: E731
    x = dict(u=f(b, length, d), delta=0.5 * f(b, length, d), A=-np.exp(0.5 * f(d, n)), B=f(b, length, n),
             C=f(b, length, n), D=f(d), z=f(b, length, d), delta_bias=0.3 * f(d))
    x = {k: jnp.asarray(v, dtype if k in ("u", "delta", "B", "C", "z") else jnp.float32) for k, v in x.items()}
    x["reset"] = jnp.asarray(r.rand(b, length) < 0.01) if reset else None
    return x


def scan_call(impl, x):
    def fwd(u, delta, A, B, C, z):
        return selective_scan(u, delta, A, B, C, D=x["D"], z=z, delta_bias=x["delta_bias"], delta_softplus=True,
                              reset=x["reset"], impl=impl)

    args = tuple(x[k] for k in ("u", "delta", "A", "B", "C", "z"))
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) * a[0].astype(jnp.float32)),
                    argnums=tuple(range(6)))
    return jax.jit(fwd), jax.jit(grad), args


def check_scan(small: bool) -> list[dict]:
    """Compiled (interpreted on CPU) Pallas scan vs the jnp reference: output and every gradient."""
    rows = []
    shapes = [(2, 100, 40, 16)] if small else [(2, 1000, 300, 16), (1, 4096, 1024, 16)]
    for (b, length, d, n) in shapes:
        for dtype, reset in ((jnp.float32, True), (jnp.bfloat16, False)):
            x = scan_inputs(b, length, d, n, dtype, seed=1, reset=reset)
            fwd_r, grad_r, args = scan_call("reference", x)
            fwd_k, grad_k, _ = scan_call("pallas", x)
            outs = {"y": (fwd_k(*args), fwd_r(*args))}
            outs.update({f"d{k}": pair for k, pair in zip(("u", "delta", "A", "B", "C", "z"),
                                                          zip(grad_k(*args), grad_r(*args), strict=True),
                                                          strict=True)})
            # relative to each array's scale: float32 sums in another order; bf16 inputs, same rounding
            tol = 1e-4 if dtype == jnp.float32 else 2e-2
            for name, (got, want) in outs.items():
                got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
                err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
                rows.append(dict(kernel="selective_scan pallas", shape=f"{b}x{length}x{d}x{n}",
                                 dtype=jnp.dtype(dtype).name, reset=reset, output=name, rel_err=err, ok=err <= tol))
    return rows


def check_int8(small: bool) -> list[dict]:
    rows = []
    for (m, k, n) in ([(37, 300, 260)] if small else [(37, 300, 260), (2048, 4096, 1024), (1, 8192, 512)]):
        r = np.random.RandomState(m)
        x = jnp.asarray(r.randn(m, k), jnp.bfloat16)
        w = jnp.asarray(r.randint(-127, 128, (k, n)), jnp.int8)
        s = jnp.asarray(r.rand(n) * 0.01, jnp.float32)
        want = np.asarray(int8_matmul_reference(x, w, s), np.float32)
        got = np.asarray(jax.jit(lambda a, b_, c: int8_matmul(a, b_, c, impl="pallas"))(x, w, s), np.float32)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        rows.append(dict(kernel="int8_matmul pallas", shape=f"{m}x{k}x{n}", dtype="bfloat16", reset=False,
                         output="y", rel_err=err, ok=err <= 2e-2))
    return rows


def scan_speed(small: bool, bandwidth: float) -> list[dict]:
    b, d, n = (1, 128, 16) if small else (1, 8192, 16)
    lengths = (256, 512) if small else (2048, 16384, 65536)
    impls = ("pallas", "chunked", "scan")
    rows = []
    for length in lengths:
        x = scan_inputs(b, length, d, n, jnp.bfloat16)
        for impl in impls:
            fwd, grad, args = scan_call(impl, x)
            y = fwd(*args)
            fwd_bytes = nbytes(args, x["D"], x["delta_bias"], y)
            bwd_bytes = fwd_bytes + nbytes(args, y) + nbytes(args)  # reads inputs + dy again, writes grads
            for mode, fn, moved in (("fwd", fwd, fwd_bytes), ("fwd+bwd", grad, bwd_bytes)):
                t = timed(fn, *args, repeats=3)
                rows.append(dict(length=length, impl=impl, mode=mode, seconds=t, gbps=moved / t / 1e9,
                                 frac_bw=moved / t / bandwidth))
            print(f"  scan {impl:8s} L={length:6d}: fwd {rows[-2]['seconds'] * 1e3:9.2f} ms  "
                  f"fwd+bwd {rows[-1]['seconds'] * 1e3:9.2f} ms", flush=True)
    return rows


def tune_gpu_scan(length: int = 16384) -> list[dict]:
    """Forward+backward time of the GPU scan kernel over its knobs (channels per program, steps per
    load group, warps) at one length: which defaults to keep."""
    from kernels import ssm_pallas_gpu as gpu

    defaults = (gpu.TILE, gpu.GROUP, gpu.NUM_WARPS)
    x = scan_inputs(1, length, 8192, 16, jnp.bfloat16)
    rows = []
    try:
        for tile, group, warps in [(32, 8, 2), (32, 16, 2), (32, 8, 1), (64, 8, 4), (64, 16, 4), (16, 8, 1),
                                   (128, 8, 4), (32, 4, 2)]:
            gpu.TILE, gpu.GROUP, gpu.NUM_WARPS = tile, group, warps
            fwd, grad, args = scan_call("pallas", x)
            rows.append(dict(tile=tile, group=group, warps=warps, fwd_s=timed(fwd, *args, repeats=3),
                             fwd_bwd_s=timed(grad, *args, repeats=3)))
            print(f"  tune {rows[-1]}", flush=True)
    finally:
        gpu.TILE, gpu.GROUP, gpu.NUM_WARPS = defaults
    return rows


def int8_speed(small: bool) -> list[dict]:
    shapes = [(256, 512, 1024)] if small else [(2048, 4096, 14336), (2048, 14336, 4096), (64, 4096, 14336)]
    rows = []
    for (m, k, n) in shapes:
        r = np.random.RandomState(0)
        x = jnp.asarray(r.randn(m, k), jnp.bfloat16)
        w = jnp.asarray(r.randint(-127, 128, (k, n)), jnp.int8)
        wb = w.astype(jnp.bfloat16)
        s = jnp.asarray(r.rand(n) * 0.01, jnp.float32)
        cases = {"int8 pallas": (jax.jit(lambda a, b_, c: int8_matmul(a, b_, c, impl="pallas")), (x, w, s)),
                 "int8 xla": (jax.jit(lambda a, b_, c: int8_matmul(a, b_, c, impl="xla")), (x, w, s)),
                 "bf16 matmul": (jax.jit(lambda a, b_: jnp.dot(a, b_)), (x, wb))}
        for name, (fn, args) in cases.items():
            t = timed(fn, *args, repeats=10)
            rows.append(dict(shape=f"{m}x{k}x{n}", impl=name, seconds=t, tflops=2 * m * k * n / t / 1e12,
                             weight_gbps=nbytes(args[1]) / t / 1e9))
    return rows
