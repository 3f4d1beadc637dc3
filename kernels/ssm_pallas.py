"""Selective scan as a Pallas kernel with a recomputing custom VJP (the mamba_ssm CUDA kernel's plan).

Forward: a grid over (batch, d_inner tiles); each program walks time in chunks of T steps with the
[tile, n] state in the loop carry, writes y, and saves the state at the start of every chunk
(n_chunks x [tile, n]: the only residual besides the inputs).

Backward: the same grid walks the chunks in reverse; it recomputes a chunk's T states from its
saved boundary state, then runs the reverse-time recurrence

    g_t = C_t dy_t + exp(dt_{t+1} A) keep_{t+1} g_{t+1}          (g_t = dLoss/dh_t)

accumulating du, d(dt), dA, partial dB and dC (summed over d-tiles outside the kernel) and dh0.
Runs compiled on GPU/TPU and with `interpret=True` on CPU, where the tests check it against the
reference. The D skip, z gate, delta bias and softplus stay outside (plain jnp, autodiffed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_F32 = jnp.float32


def _row(ref, t):
    return ref[pl.ds(t, 1), :].astype(_F32)  # [1, cols]


def _fwd_kernel(u_ref, dt_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref, y_ref, hs_ref, hlast_ref, *, chunk, n_chunks):
    a_DxN = a_ref[...].astype(_F32)
    tile = a_DxN.shape[0]

    def chunk_body(c, h):
        hs_ref[pl.ds(c, 1), :, :] = h[None]

        def step(i, h):
            t = c * chunk + i
            dt_Dx1 = _row(dt_ref, t).reshape(tile, 1)
            x_Dx1 = dt_Dx1 * _row(u_ref, t).reshape(tile, 1)
            h = h * _row(keep_ref, t) * jnp.exp(dt_Dx1 * a_DxN) + x_Dx1 * _row(b_ref, t)
            y_ref[pl.ds(t, 1), :] = jnp.sum(h * _row(c_ref, t), axis=1)[None, :].astype(y_ref.dtype)
            return h

        return jax.lax.fori_loop(0, chunk, step, h)

    hlast_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk_body, h0_ref[...].astype(_F32))


def _bwd_kernel(u_ref, dt_ref, b_ref, c_ref, keep_ref, a_ref, hs_ref, dy_ref, dhlast_ref,
                du_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref, *, chunk, n_chunks):
    a_DxN = a_ref[...].astype(_F32)
    tile, n = a_DxN.shape

    def inputs(t):
        dt_Dx1 = _row(dt_ref, t).reshape(tile, 1)
        u_Dx1 = _row(u_ref, t).reshape(tile, 1)
        decay_DxN = _row(keep_ref, t) * jnp.exp(dt_Dx1 * a_DxN)
        return dt_Dx1, u_Dx1, decay_DxN

    def chunk_body(k, carry):
        g, da = carry
        c = n_chunks - 1 - k
        # recompute this chunk's states: states[i] = h_{c*T + i - 1} (states[0] = the saved boundary)
        states = jnp.zeros((chunk + 1, tile, n), _F32).at[0].set(hs_ref[pl.ds(c, 1), :, :][0])

        def fwd_step(i, states):
            t = c * chunk + i
            dt_Dx1, u_Dx1, decay = inputs(t)
            h = decay * states[i] + dt_Dx1 * u_Dx1 * _row(b_ref, t)
            return jax.lax.dynamic_update_slice(states, h[None], (i + 1, 0, 0))

        states = jax.lax.fori_loop(0, chunk, fwd_step, states)

        def bwd_step(j, carry):
            g, da = carry  # g: dLoss/dh_t from the future (already through the decay of step t+1)
            i = chunk - 1 - j
            t = c * chunk + i
            dt_Dx1, u_Dx1, decay = inputs(t)
            b_1xN, c_1xN = _row(b_ref, t), _row(c_ref, t)
            dy_Dx1 = _row(dy_ref, t).reshape(tile, 1)
            h_t = jax.lax.dynamic_index_in_dim(states, i + 1, keepdims=False)
            h_prev = jax.lax.dynamic_index_in_dim(states, i, keepdims=False)
            g = g + dy_Dx1 * c_1xN
            dc_ref[pl.ds(t, 1), :] = jnp.sum(dy_Dx1 * h_t, axis=0, keepdims=True)
            gb_D = jnp.sum(g * b_1xN, axis=1)  # [tile]
            du_ref[pl.ds(t, 1), :] = (dt_Dx1[:, 0] * gb_D)[None, :]
            db_ref[pl.ds(t, 1), :] = jnp.sum(g * (dt_Dx1 * u_Dx1), axis=0, keepdims=True)
            g_decay = g * decay * h_prev  # d/d(dt A) of the decay term
            ddt_ref[pl.ds(t, 1), :] = (u_Dx1[:, 0] * gb_D + jnp.sum(g_decay * a_DxN, axis=1))[None, :]
            da = da + g_decay * dt_Dx1
            return g * decay, da

        return jax.lax.fori_loop(0, chunk, bwd_step, (g, da))

    g0 = dhlast_ref[...].astype(_F32)
    g, da = jax.lax.fori_loop(0, n_chunks, chunk_body, (g0, jnp.zeros((tile, n), _F32)))
    da_ref[...] = da
    dh0_ref[...] = g


def _specs(b, lp, dp, n, tile, n_chunks):
    """BlockSpecs over the grid (batch, d-tile)."""
    seq_d = pl.BlockSpec((None, lp, tile), lambda i, j: (i, 0, j))  # [b, L, d] -> [L, tile]
    seq_n = pl.BlockSpec((None, lp, n), lambda i, j: (i, 0, 0))  # [b, L, n] -> [L, n]
    keep = pl.BlockSpec((None, lp, 1), lambda i, j: (i, 0, 0))  # [b, L, 1]
    a = pl.BlockSpec((tile, n), lambda i, j: (j, 0))  # [d, n]
    state = pl.BlockSpec((None, tile, n), lambda i, j: (i, j, 0))  # [b, d, n]
    states = pl.BlockSpec((None, n_chunks, tile, n), lambda i, j: (i, 0, j, 0))  # [b, C, d, n]
    partial_n = pl.BlockSpec((None, None, lp, n), lambda i, j: (i, j, 0, 0))  # [b, d-tiles, L, n]
    return seq_d, seq_n, keep, a, state, states, partial_n


def _padded(u, dt, A, B, C, keep, h0, chunk, tile):
    b, length, d = u.shape
    lp = -(-length // chunk) * chunk
    dp = -(-d // tile) * tile
    pl_, pd = lp - length, dp - d
    pad3 = lambda x, fill=0.0: jnp.pad(x, [(0, 0), (0, pl_), (0, 0)], constant_values=fill)  # noqa: E731
    u = jnp.pad(pad3(u), [(0, 0), (0, 0), (0, pd)])
    dt = jnp.pad(pad3(dt), [(0, 0), (0, 0), (0, pd)])  # dt = 0 on padding: state untouched
    return (u, dt, jnp.pad(A, [(0, pd), (0, 0)]), pad3(B), pad3(C), pad3(keep[..., None], 1.0),
            jnp.pad(h0, [(0, 0), (0, pd), (0, 0)]), lp, dp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _core(u, dt, A, B, C, keep, h0, chunk, tile, interpret):
    return _core_fwd(u, dt, A, B, C, keep, h0, chunk, tile, interpret)[0]


def _core_fwd(u, dt, A, B, C, keep, h0, chunk, tile, interpret):
    b, length, d = u.shape
    n = A.shape[1]
    up, dtp, ap, bp, cp, kp, h0p, lp, dp = _padded(u, dt, A, B, C, keep, h0, chunk, tile)
    n_chunks = lp // chunk
    seq_d, seq_n, keep_s, a_s, state, states, _ = _specs(b, lp, dp, n, tile, n_chunks)
    y, hs, h_last = pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=chunk, n_chunks=n_chunks),
        grid=(b, dp // tile),
        in_specs=[seq_d, seq_d, seq_n, seq_n, keep_s, a_s, state],
        out_specs=[seq_d, states, state],
        out_shape=[jax.ShapeDtypeStruct((b, lp, dp), _F32), jax.ShapeDtypeStruct((b, n_chunks, dp, n), _F32),
                   jax.ShapeDtypeStruct((b, dp, n), _F32)],
        interpret=interpret,
    )(up, dtp, bp, cp, kp, ap, h0p)
    out = (y[:, :length, :d], h_last[:, :d])
    return out, (u, dt, A, B, C, keep, hs)


def _core_bwd(chunk, tile, interpret, res, cotangents):
    u, dt, A, B, C, keep, hs = res
    dy, dh_last = cotangents
    b, length, d = u.shape
    n = A.shape[1]
    up, dtp, ap, bp, cp, kp, _, lp, dp = _padded(u, dt, A, B, C, keep, jnp.zeros((b, d, n), _F32), chunk, tile)
    dyp = jnp.pad(dy.astype(_F32), [(0, 0), (0, lp - length), (0, dp - d)])
    dhp = jnp.pad(dh_last.astype(_F32), [(0, 0), (0, dp - d), (0, 0)])
    n_chunks, n_tiles = lp // chunk, dp // tile
    seq_d, seq_n, keep_s, a_s, state, states, partial_n = _specs(b, lp, dp, n, tile, n_chunks)
    da_partial = pl.BlockSpec((None, tile, n), lambda i, j: (i, j, 0))  # [b, d, n], summed over b below
    du, ddt, db, dc, da, dh0 = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk, n_chunks=n_chunks),
        grid=(b, n_tiles),
        in_specs=[seq_d, seq_d, seq_n, seq_n, keep_s, a_s, states, seq_d, state],
        out_specs=[seq_d, seq_d, partial_n, partial_n, da_partial, state],
        out_shape=[jax.ShapeDtypeStruct((b, lp, dp), _F32), jax.ShapeDtypeStruct((b, lp, dp), _F32),
                   jax.ShapeDtypeStruct((b, n_tiles, lp, n), _F32), jax.ShapeDtypeStruct((b, n_tiles, lp, n), _F32),
                   jax.ShapeDtypeStruct((b, dp, n), _F32), jax.ShapeDtypeStruct((b, dp, n), _F32)],
        interpret=interpret,
    )(up, dtp, bp, cp, kp, ap, hs, dyp, dhp)
    return (du[:, :length, :d].astype(u.dtype), ddt[:, :length, :d].astype(dt.dtype), da.sum(0)[:d].astype(A.dtype),
            db.sum(1)[:, :length].astype(B.dtype), dc.sum(1)[:, :length].astype(C.dtype), jnp.zeros_like(keep),
            dh0[:, :d])


_core.defvjp(_core_fwd, _core_bwd)


def scan_pallas(u, dt, A, B, C, h0, reset, chunk=64, tile=None, interpret=None):
    """Pallas selective scan; `interpret` defaults to True on CPU and False on GPU/TPU."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    d = u.shape[2]
    tile = tile or min(64, 1 << (d - 1).bit_length())  # a power of two, at most 64 channels
    chunk = max(1, min(chunk, u.shape[1]))
    keep = jnp.ones(u.shape[:2], _F32) if reset is None else (~reset).astype(_F32)
    return _core(u.astype(_F32), dt, A.astype(_F32), B.astype(_F32), C.astype(_F32), keep, h0, chunk, tile,
                 interpret)
