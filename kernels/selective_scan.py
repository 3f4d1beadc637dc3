"""Mamba's selective scan (Gu & Dao 2023, Algorithm 2), several ways behind one function.

For each batch b, channel d and state n, with dt = softplus(delta + delta_bias) (optional):

    h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] * u[t]      (h[-1] = initial_state or 0)
    y[t] = <h[t], C[t]> + D * u[t],     then y[t] *= silu(z[t])

which is mamba_ssm's `selective_scan_ref` in the layout [batch, length, channels]. `reset[b, t]`
(packed sequences) zeroes the carried state before step t, so a document's first token starts
from h = 0 exactly as an unpacked sequence does.

Implementations (`impl=`):
  reference    plain jnp, float32, materialises [batch, length, d_inner, d_state]: the oracle.
  scan         fused sequential loop that discretises inside the step. The outer loop runs over chunks
               whose states the backward recomputes from each chunk's start (a hand-written VJP), so
               neither pass holds more than one chunk of [batch, d_state, d_inner] states. CPU default.
  associative  `lax.associative_scan` over (exp(dt A), dt B u) pairs (the S5 form), parallel in
               length, materialises [batch, length, d_inner, d_state].
  chunked      associative scan inside chunks of 64 steps, state carried across chunks: memory
               bounded by one chunk's [batch, 64, d_inner, d_state].
  pallas       Pallas kernels with a custom VJP whose backward recomputes from saved chunk-start
               states (`kernels.ssm_pallas`): the Mosaic TPU kernel when tracing for a TPU, the
               Triton kernel for a GPU; on a CPU the Triton kernel's body in interpret mode.
  pallas_tpu,  one kernel family by name (the other platform's family fails to compile; on a CPU
  pallas_gpu   each runs in its interpreter, which is how the tests check both).
  auto         `scan` on CPU; on GPU and TPU the platform's Pallas kernel (`KERNEL_PLATFORMS`), or
               `chunked` with a logged warning on a platform that has none.

The platform is `kernels.target_platform(...)` when set (tests lower TPU and GPU programs from a
CPU that way), else JAX's default backend.

Every implementation is differentiable in all inputs, initial_state included, and d_inner is
independent throughout, so a tensor-parallel shard of channels needs no communication.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import ssm_xla
from kernels.platform import current_platform, log_once
from kernels.ssm_pallas import scan_pallas

_F32 = jnp.float32


def prepare_delta(delta, delta_bias=None, delta_softplus=False):
    """dt in float32: delta (+ bias), softplus'd if asked. [batch, length, d_inner]."""
    dt = delta.astype(_F32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(_F32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def skip_and_gate(y_BxLxD, u, D=None, z=None):
    """Adds the D skip and the silu(z) gate in float32, returns y in u's dtype."""
    if D is not None:
        y_BxLxD = y_BxLxD + u.astype(_F32) * D.astype(_F32)
    if z is not None:
        y_BxLxD = y_BxLxD * jax.nn.silu(z.astype(_F32))
    return y_BxLxD.astype(u.dtype)


def _initial_state(u, A, initial_state):
    b, d, n = u.shape[0], u.shape[2], A.shape[1]
    if initial_state is None:
        return jnp.zeros((b, d, n), _F32)
    if initial_state.shape != (b, d, n):
        raise ValueError(f"initial_state has shape {initial_state.shape}, expected {(b, d, n)}")
    return initial_state.astype(_F32)


_IMPL_FNS = {
    "reference": ssm_xla.scan_reference,
    "scan": ssm_xla.scan_fused,
    "associative": ssm_xla.scan_associative,
    "chunked": ssm_xla.scan_chunked,
    "pallas": scan_pallas,
    "pallas_tpu": functools.partial(scan_pallas, family="tpu"),
    "pallas_gpu": functools.partial(scan_pallas, family="gpu"),
}
IMPLS = tuple(_IMPL_FNS)
# the platforms whose Pallas kernel compiles (tests/test_kernel_lowering.py lowers each one)
KERNEL_PLATFORMS = ("tpu", "gpu")


def resolve_impl(impl: str) -> str:
    """'auto' -> 'scan' on CPU; 'pallas' on a platform in KERNEL_PLATFORMS, else 'chunked' (logged)."""
    if impl == "auto":
        platform = current_platform()
        if platform == "cpu":
            return "scan"
        if platform in KERNEL_PLATFORMS:
            return "pallas"
        log_once("selective_scan", f"selective_scan: no Pallas kernel for platform {platform!r}; "
                                   "impl='auto' runs the chunked XLA scan")
        return "chunked"
    if impl not in _IMPL_FNS:
        raise ValueError(f"selective_scan impl={impl!r} is not available; choose one of "
                         f"{('auto',) + tuple(_IMPL_FNS)}")
    return impl


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, reset=None, impl="auto"):
    """Selective scan; semantics of mamba_ssm's `selective_scan_ref`, layout [batch, length, ...].

    Args:
      u, delta, z: [batch, length, d_inner]. A: [d_inner, d_state]. B, C: [batch, length, d_state].
      D, delta_bias: [d_inner]. initial_state: [batch, d_inner, d_state].
      reset: [batch, length] bool, true at a packed document's first token.
    Returns:
      y [batch, length, d_inner] in u's dtype, and the final state [batch, d_inner, d_state]
      (float32) when `return_final_state`.
    """
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be [batch, length, d_inner]; got {u.shape}, {delta.shape}")
    b, length, d = u.shape
    n = A.shape[-1]
    if A.shape != (d, n) or B.shape != (b, length, n) or C.shape != (b, length, n):
        raise ValueError(f"shape mismatch: A {A.shape} (want {(d, n)}), B {B.shape} and C {C.shape} "
                         f"(want {(b, length, n)})")
    if reset is not None and reset.shape != (b, length):
        raise ValueError(f"reset has shape {reset.shape}, expected {(b, length)}")
    dt = prepare_delta(delta, delta_bias, delta_softplus)
    h0 = _initial_state(u, A, initial_state)
    y, h_last = _IMPL_FNS[resolve_impl(impl)](u, dt, A, B, C, h0, reset)
    y = skip_and_gate(y, u, D, z)
    return (y, h_last) if return_final_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step; equals `selective_scan` of length 1 started from `state`.

    state: [batch, d_inner, d_state]; x, dt, z: [batch, d_inner]; B, C: [batch, d_state].
    Returns (y [batch, d_inner] in x's dtype, new_state float32).
    """
    dt = prepare_delta(dt, dt_bias, dt_softplus)
    dA = jnp.exp(dt[:, :, None] * A.astype(_F32))
    h = dA * state.astype(_F32) + (dt * x.astype(_F32))[:, :, None] * B.astype(_F32)[:, None, :]
    y = jnp.einsum("bdn,bn->bd", h, C.astype(_F32))
    y = skip_and_gate(y[:, None], x[:, None], D, None if z is None else z[:, None])[:, 0]
    return y, h
