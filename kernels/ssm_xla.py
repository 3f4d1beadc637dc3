"""The selective-scan recurrence in plain XLA: reference, fused scan, associative, chunked.

Every function here takes u [b, L, d], dt [b, L, d] (float32, bias and softplus applied),
A [d, n], B, C [b, L, n], h0 [b, d, n] (float32) and reset [b, L] bool or None, and returns
(y [b, L, d] float32 without the D skip or z gate, h_last [b, d, n] float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _discretise(u, dt, A, B, reset):
    """exp(dt A) and dt B u, both [..., d, n]; exp(dt A) zeroed where the state is reset."""
    dA = jnp.exp(dt[..., None] * A.astype(_F32))
    dBu = (dt * u.astype(_F32))[..., None] * B.astype(_F32)[..., None, :]
    if reset is not None:
        dA = jnp.where(reset[..., None, None], 0.0, dA)
    return dA, dBu


def _combine(left, right):
    """Composition of two affine maps h -> a h + b (left first): the S5 associative operator."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def scan_reference(u, dt, A, B, C, h0, reset):
    """The oracle: materialises exp(dt A) and dt B u over the whole sequence, then recurs."""
    dA_BxLxDxN, dBu_BxLxDxN = _discretise(u, dt, A, B, reset)

    def step(h, xs):
        dA, dBu, c = xs
        h = dA * h + dBu
        return h, jnp.einsum("bdn,bn->bd", h, c)

    xs = (jnp.moveaxis(dA_BxLxDxN, 1, 0), jnp.moveaxis(dBu_BxLxDxN, 1, 0), jnp.moveaxis(C.astype(_F32), 1, 0))
    h, y_LxBxD = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(y_LxBxD, 0, 1), h


def scan_associative(u, dt, A, B, C, h0, reset):
    """`lax.associative_scan` over the whole length: O(log L) depth, [b, L, d, n] memory."""
    dA, dBu = _discretise(u, dt, A, B, reset)
    dBu = dBu.at[:, 0].add(dA[:, 0] * h0)  # fold the initial state into the first element
    _, h_BxLxDxN = jax.lax.associative_scan(_combine, (dA, dBu), axis=1)
    y = jnp.einsum("bldn,bln->bld", h_BxLxDxN, C.astype(_F32))
    return y, h_BxLxDxN[:, -1]


# ------------------------------------------------------------------------------------------------
# Chunk-rematerialised drivers: an outer lax.scan over chunks of T steps carries the state; each
# chunk's body is wrapped in jax.checkpoint, so autodiff keeps only the chunk-boundary states and
# recomputes one chunk at a time in the backward pass.
# ------------------------------------------------------------------------------------------------
def _chunk_sequential(A):
    def run(h_BxDxN, xs):
        def step(h, x):
            u_t, dt_t, b_t, c_t, keep_t = x  # [b, d] [b, d] [b, n] [b, n] [b] or None
            if keep_t is not None:
                h = h * keep_t[:, None, None]
            h = jnp.exp(dt_t[:, :, None] * A) * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
            return h, jnp.einsum("bdn,bn->bd", h, c_t)

        return jax.lax.scan(step, h_BxDxN, xs)

    return run


def _chunk_parallel(A):
    def run(h_BxDxN, xs):
        u, dt, b, c, keep = xs  # [T, b, d] [T, b, d] [T, b, n] [T, b, n] [T, b] or None
        dA, dBu = _discretise(u, dt, A, b, None if keep is None else keep == 0)
        dBu = dBu.at[0].add(dA[0] * h_BxDxN)
        _, h_TxBxDxN = jax.lax.associative_scan(_combine, (dA, dBu), axis=0)
        return h_TxBxDxN[-1], jnp.einsum("tbdn,tbn->tbd", h_TxBxDxN, c)

    return run


def _run_chunks(u, dt, A, B, C, h0, reset, chunk, make_chunk_fn):
    b, length, d = u.shape
    t = max(1, min(chunk, length))
    n_chunks = -(-length // t)
    pad = n_chunks * t - length

    def to_chunks(x, fill=0.0):  # [b, L, ...] -> [n_chunks, T, b, ...]
        # padded steps are no-ops: dt = 0 leaves h unchanged and keep = 1 does not reset it
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        x = jnp.moveaxis(x, 1, 0)
        return x.reshape((n_chunks, t) + x.shape[1:])

    keep = None if reset is None else to_chunks((~reset).astype(_F32), fill=1.0)
    xs = (to_chunks(u.astype(_F32)), to_chunks(dt), to_chunks(B.astype(_F32)), to_chunks(C.astype(_F32)), keep)
    run_chunk = jax.checkpoint(make_chunk_fn(A.astype(_F32)), prevent_cse=False)
    h, y = jax.lax.scan(run_chunk, h0, xs)  # y: [n_chunks, T, b, d]
    y = y.reshape((n_chunks * t, b, d))[:length]
    return jnp.moveaxis(y, 0, 1), h


def scan_fused(u, dt, A, B, C, h0, reset, chunk=None):
    """Sequential `lax.scan` discretising inside the step; chunks of about sqrt(L) steps balance the
    saved boundary states against the per-chunk recompute buffer."""
    chunk = chunk or max(1, int(round(u.shape[1] ** 0.5)))
    return _run_chunks(u, dt, A, B, C, h0, reset, chunk, _chunk_sequential)


def scan_chunked(u, dt, A, B, C, h0, reset, chunk=64):
    """Associative scan inside chunks of `chunk` steps, state carried across chunks: parallel within
    a chunk, memory bounded by one chunk's [b, chunk, d, n]."""
    return _run_chunks(u, dt, A, B, C, h0, reset, chunk, _chunk_parallel)
