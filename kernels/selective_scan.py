"""Mamba's selective scan (Gu & Dao 2023, Algorithm 2), several ways behind one function.

For each batch b, channel d and state n, with dt = softplus(delta + delta_bias) (optional):

    h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] * u[t]      (h[-1] = initial_state or 0)
    y[t] = <h[t], C[t]> + D * u[t],     then y[t] *= silu(z[t])

which is mamba_ssm's `selective_scan_ref` in the layout [batch, length, channels]. `reset[b, t]`
(packed sequences) zeroes the carried state before step t, so a document's first token starts
from h = 0 exactly as an unpacked sequence does.

Implementations (`impl=`):
  reference    plain jnp, float32, materialises [batch, length, d_inner, d_state]: the oracle.
  scan         fused `lax.scan` that discretises inside the step. The outer scan runs over chunks
               whose inner scan is rematerialised, so neither the forward nor the backward pass
               holds more than one chunk of [batch, d_inner, d_state] states. CPU default.
  associative  `lax.associative_scan` over (exp(dt A), dt B u) pairs (the S5 form), parallel in
               length, materialises [batch, length, d_inner, d_state].
  auto         `scan` (the Pallas kernel takes over on GPU/TPU once it lands).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("reference", "scan", "associative")
_F32 = jnp.float32


def _prepare_delta(delta, delta_bias, delta_softplus):
    """dt in float32: delta (+ bias), softplus'd if asked. [batch, length, d_inner]."""
    dt = delta.astype(_F32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(_F32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def _finish(y_BxLxD, u, D, z):
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


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def _scan_reference(u, dt, A, B, C, h0, reset):
    dA_BxLxDxN = jnp.exp(dt[..., None] * A.astype(_F32))
    dBu_BxLxDxN = (dt * u.astype(_F32))[..., None] * B.astype(_F32)[:, :, None, :]
    if reset is not None:
        dA_BxLxDxN = jnp.where(reset[:, :, None, None], 0.0, dA_BxLxDxN)

    def step(h, xs):
        dA, dBu, c = xs
        h = dA * h + dBu
        return h, jnp.einsum("bdn,bn->bd", h, c)

    xs = (jnp.moveaxis(dA_BxLxDxN, 1, 0), jnp.moveaxis(dBu_BxLxDxN, 1, 0),
          jnp.moveaxis(C.astype(_F32), 1, 0))
    h, y_LxBxD = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(y_LxBxD, 0, 1), h


# ------------------------------------------------------------------------------------------------
# associative (S5 form)
# ------------------------------------------------------------------------------------------------
def _scan_associative(u, dt, A, B, C, h0, reset):
    dA = jnp.exp(dt[..., None] * A.astype(_F32))
    dBu = (dt * u.astype(_F32))[..., None] * B.astype(_F32)[:, :, None, :]
    if reset is not None:
        dA = jnp.where(reset[:, :, None, None], 0.0, dA)
    # Fold the initial state into the first element: h[0] = dA[0] h0 + dBu[0].
    dBu = dBu.at[:, 0].add(dA[:, 0] * h0)

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    _, h_BxLxDxN = jax.lax.associative_scan(combine, (dA, dBu), axis=1)
    y = jnp.einsum("bldn,bln->bld", h_BxLxDxN, C.astype(_F32))
    return y, h_BxLxDxN[:, -1]


# ------------------------------------------------------------------------------------------------
# fused lax.scan, chunk-rematerialised
# ------------------------------------------------------------------------------------------------
def _pick_chunk(length: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, min(chunk, length))
    # about sqrt(L) chunks of about sqrt(L) steps balances the saved boundary states against the
    # per-chunk recompute buffer in the backward pass.
    return max(1, min(length, int(round(length ** 0.5))))


def _scan_fused(u, dt, A, B, C, h0, reset, chunk=None):
    b, length, d = u.shape
    t = _pick_chunk(length, chunk)
    n_chunks = -(-length // t)
    pad = n_chunks * t - length
    A = A.astype(_F32)
    keep = None if reset is None else (~reset).astype(_F32)  # [batch, length]

    def to_chunks(x, fill=0.0):  # [batch, length, ...] -> [n_chunks, t, batch, ...]
        # padded steps are no-ops: dt = 0 leaves h unchanged, keep = 1 does not reset it
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        x = jnp.moveaxis(x, 1, 0)
        return x.reshape((n_chunks, t) + x.shape[1:])

    xs = (to_chunks(u.astype(_F32)), to_chunks(dt), to_chunks(B.astype(_F32)), to_chunks(C.astype(_F32)),
          None if keep is None else to_chunks(keep, fill=1.0))

    def step(h_BxDxN, x):
        u_t, dt_t, b_t, c_t, keep_t = x  # [batch, d] [batch, d] [batch, n] [batch, n] [batch]
        if keep_t is not None:
            h_BxDxN = h_BxDxN * keep_t[:, None, None]
        dA = jnp.exp(dt_t[:, :, None] * A)
        h_BxDxN = dA * h_BxDxN + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
        return h_BxDxN, jnp.einsum("bdn,bn->bd", h_BxDxN, c_t)

    @jax.checkpoint
    def run_chunk(h, chunk_xs):
        return jax.lax.scan(step, h, chunk_xs)

    h, y = jax.lax.scan(run_chunk, h0, xs)  # y: [n_chunks, t, batch, d]
    y = y.reshape((n_chunks * t, b, d))[:length]
    return jnp.moveaxis(y, 0, 1), h


_IMPL_FNS = {"reference": _scan_reference, "scan": _scan_fused, "associative": _scan_associative}


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "scan"
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
    dt = _prepare_delta(delta, delta_bias, delta_softplus)
    h0 = _initial_state(u, A, initial_state)
    y, h_last = _IMPL_FNS[resolve_impl(impl)](u, dt, A, B, C, h0, reset)
    y = _finish(y, u, D, z)
    return (y, h_last) if return_final_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step; equals `selective_scan` of length 1 started from `state`.

    state: [batch, d_inner, d_state]; x, dt, z: [batch, d_inner]; B, C: [batch, d_state].
    Returns (y [batch, d_inner] in x's dtype, new_state float32).
    """
    dt = _prepare_delta(dt, dt_bias, dt_softplus)
    dA = jnp.exp(dt[:, :, None] * A.astype(_F32))
    h = dA * state.astype(_F32) + (dt * x.astype(_F32))[:, :, None] * B.astype(_F32)[:, None, :]
    y = jnp.einsum("bdn,bn->bd", h, C.astype(_F32))
    y = _finish(y[:, None], x[:, None], D, None if z is None else z[:, None])[:, 0]
    return y, h
