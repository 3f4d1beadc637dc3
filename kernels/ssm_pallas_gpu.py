"""The selective scan's Pallas GPU kernels (Triton backend): forward and recomputing backward.

Why Triton and not Mosaic GPU (the default Pallas GPU backend from jax 0.10): the scan is a
sequential walk over time with a tiny [n, W] state per program, reading one row of u, dt, B, C
per step. Triton keeps the operands in HBM and loads exactly the rows a step needs, so one kernel
lowers at every length (Mosaic GPU stages whole blocks through shared memory: a 1K-token block
already overflows its 227 KiB) and it needs no warpgroup layouts for row-wise arithmetic. The same
code lowers under jax 0.10.2 and 0.11 (where the Triton backend is deprecated but present, and
emits a DeprecationWarning when lowering); a Mosaic GPU port with `plgpu.emit_pipeline` over time
chunks is the route once it goes.

Inputs arrive padded (see `kernels.ssm_pallas`): u, dt [b, L, d] and B, C [b, L, n] (any float
dtype, converted to float32 on load), keep [b, L, 1], A and states transposed to [n, d] /
[b, n, d]. n and the channel tile W are powers of two (Triton's block rule).

Forward: one program per (batch row, d-tile) walks the whole sequence in chunks of T steps with
the [n, W] state in registers, writes y and saves the state at each chunk's start. Steps go in
groups of U: a group's rows are all loaded before its first step runs, so their memory latencies
overlap instead of stalling every step (Triton lowers no unrolled `fori_loop`, so the group is
unrolled by hand).

Backward: the same grid walks the chunks in reverse. A chunk's T states are recomputed from its
saved start into an HBM scratch output ([b, d-tiles, T, n, W]: registers cannot be indexed by a
dynamic step), then the reverse recurrence of `kernels.ssm_step` runs over them. dB and dC sum
over all channels, so each program adds its tile's part with atomic adds, as mamba_ssm's CUDA
backward does (their summation order, and so their last bits, vary from run to run).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels import ssm_step
from kernels.blocks import pow2, round_up

_F32 = jnp.float32
CHUNK = 64  # forward: how often the state is saved; backward: the recompute scratch's length
TILE = 32  # channels per program
GROUP = 8  # steps whose rows are loaded together (U above)
NUM_WARPS = 2


def plan(length: int, d: int, n: int, chunk: int | None = None, tile: int | None = None):
    """(T, forward W, backward W, n padded to a power of two); T is a multiple of the step group."""
    tile = tile or TILE
    if tile & (tile - 1):
        raise ValueError(f"GPU scan: tile {tile} must be a power of two")
    tile = min(tile, pow2(d))
    group = _group(chunk or CHUNK)
    return min(round_up(chunk or CHUNK, group), round_up(length, group)), tile, tile, pow2(n)


def _group(chunk: int) -> int:
    """Steps per load group: GROUP, or less for a chunk it does not divide."""
    g = GROUP
    while chunk % g:
        g //= 2
    return g


def _params():
    return plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _row(ref, t):
    return ref[pl.ds(t, 1), :].astype(_F32)


def _step_inputs(t, dt_ref, u_ref, b_ref, c_ref, keep_ref):
    n = b_ref.shape[-1]
    col = lambda ref: _row(ref, t).reshape(n, 1)  # noqa: E731
    return _row(dt_ref, t), _row(u_ref, t), col(b_ref), col(c_ref), _row(keep_ref, t)


def _load_state(ref, c):
    return ref[pl.ds(c, 1), :, :][0].astype(_F32)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
def _fwd_kernel(u_ref, dt_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref, y_ref, hs_ref, hlast_ref, *, chunk, n_chunks):
    a_NxW = a_ref[...].astype(_F32)
    group = _group(chunk)

    def chunk_body(c, h):
        hs_ref[pl.ds(c, 1), :, :] = h[None]

        def group_body(g, h):
            t0 = c * chunk + g * group
            rows = [_step_inputs(t0 + i, dt_ref, u_ref, b_ref, c_ref, keep_ref) for i in range(group)]
            for i, (dt, u, b, cc, keep) in enumerate(rows):
                h = ssm_step.forward(h, a_NxW, dt, u, b, keep)
                y_ref[pl.ds(t0 + i, 1), :] = ssm_step.output(h, cc)
            return h

        return jax.lax.fori_loop(0, chunk // group, group_body, h)

    hlast_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk_body, h0_ref[...].astype(_F32))


def _specs(length: int, n: int, tile: int, nc: int):
    """BlockSpecs over the grid (batch, d-tile): a program sees its row's whole sequence."""
    return (pl.BlockSpec((None, length, tile), lambda i, j: (i, 0, j)),  # [b, L, d] -> [L, W]
            pl.BlockSpec((None, length, n), lambda i, j: (i, 0, 0)),  # [b, L, n] -> [L, n]
            pl.BlockSpec((None, length, 1), lambda i, j: (i, 0, 0)),  # keep [b, L, 1]
            pl.BlockSpec((n, tile), lambda i, j: (0, j)),  # A [n, d]
            pl.BlockSpec((None, n, tile), lambda i, j: (i, 0, j)),  # a state [b, n, d]
            pl.BlockSpec((None, nc, n, tile), lambda i, j: (i, 0, 0, j)))  # chunk starts [b, L/T, n, d]


def forward(u, dt, B, C, keep, a_NxD, h0_BxNxD, chunk, tile, interpret):
    """(y [b, L, d], chunk-start states [b, L/T, n, d], last state [b, n, d]), all float32."""
    b, length, d = u.shape
    n = a_NxD.shape[0]
    nc, nt = length // chunk, d // tile
    seq_d, seq_n, keep_s, a_s, state, starts = _specs(length, n, tile, nc)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=chunk, n_chunks=nc),
        grid=(b, nt),
        in_specs=[seq_d, seq_d, seq_n, seq_n, keep_s, a_s, state],
        out_specs=[seq_d, starts, state],
        out_shape=[jax.ShapeDtypeStruct((b, length, d), _F32), jax.ShapeDtypeStruct((b, nc, n, d), _F32),
                   jax.ShapeDtypeStruct((b, n, d), _F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="selective_scan_fwd_gpu",
    )(u, dt, B, C, keep, a_NxD, h0_BxNxD)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
def _bwd_kernel(u_ref, dt_ref, b_ref, c_ref, keep_ref, a_ref, hs_ref, dy_ref, dhlast_ref, db_in, dc_in,
                du_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref, states_ref, *, chunk, n_chunks, barrier):
    del db_in, dc_in  # zeros aliased to db_ref / dc_ref, which the atomic adds accumulate into
    a_NxW = a_ref[...].astype(_F32)
    n = a_NxW.shape[0]
    group = _group(chunk)

    def chunk_body(k, carry):
        c = n_chunks - 1 - k

        def recompute(g, h):  # states_ref[i] = the state before step c*T + i
            i0 = g * group
            rows = [_step_inputs(c * chunk + i0 + i, dt_ref, u_ref, b_ref, c_ref, keep_ref) for i in range(group)]
            for i, (dt, u, b, _, keep) in enumerate(rows):
                states_ref[pl.ds(i0 + i, 1), :, :] = h[None]
                h = ssm_step.forward(h, a_NxW, dt, u, b, keep)
            return h

        jax.lax.fori_loop(0, chunk // group, recompute, _load_state(hs_ref, c))
        if barrier:  # the scratch rows written above are read below by other threads
            plt.debug_barrier()

        def reverse(r, carry):
            g, da = carry
            i0 = chunk - (r + 1) * group
            t0 = c * chunk + i0
            rows = [(_step_inputs(t0 + i, dt_ref, u_ref, b_ref, c_ref, keep_ref), _load_state(states_ref, i0 + i),
                     _row(dy_ref, t0 + i)) for i in range(group)]
            for i in reversed(range(group)):
                (dt, u, b, cc, keep), h_prev, dy = rows[i]
                g, da_inc, du, ddt, db, dc = ssm_step.backward(g, h_prev, a_NxW, dt, u, b, cc, keep, dy)
                t = t0 + i
                du_ref[pl.ds(t, 1), :] = du
                ddt_ref[pl.ds(t, 1), :] = ddt
                plt.atomic_add(db_ref, (pl.ds(t, 1), slice(None)), db.reshape(1, n))
                plt.atomic_add(dc_ref, (pl.ds(t, 1), slice(None)), dc.reshape(1, n))
                da = da + da_inc
            return g, da

        carry = jax.lax.fori_loop(0, chunk // group, reverse, carry)
        if barrier:  # before the next chunk overwrites the scratch
            plt.debug_barrier()
        return carry

    g, da = jax.lax.fori_loop(0, n_chunks, chunk_body, (dhlast_ref[...].astype(_F32), jnp.zeros_like(a_NxW)))
    da_ref[...] = da
    dh0_ref[...] = g


def backward(u, dt, B, C, keep, a_NxD, starts, dy, dhlast_BxNxD, chunk, tile, interpret):
    """(du, d(dt) [b, L, d], dB, dC [b, L, n], dA partial per batch row [b, n, d], dh0 [b, n, d])."""
    b, length, d = u.shape
    n = a_NxD.shape[0]
    nc, nt = length // chunk, d // tile
    seq_d, seq_n, keep_s, a_s, state, starts_s = _specs(length, n, tile, nc)
    scratch = pl.BlockSpec((None, None, chunk, n, tile), lambda i, j: (i, j, 0, 0, 0))
    zeros_n = jnp.zeros((b, length, n), _F32)
    du, ddt, db, dc, da, dh0, _ = pl.pallas_call(
        # a CTA barrier has no meaning in the interpreter, which runs one program at a time anyway
        functools.partial(_bwd_kernel, chunk=chunk, n_chunks=nc, barrier=not interpret),
        grid=(b, nt),
        in_specs=[seq_d, seq_d, seq_n, seq_n, keep_s, a_s, starts_s, seq_d, state, seq_n, seq_n],
        out_specs=[seq_d, seq_d, seq_n, seq_n, state, state, scratch],
        out_shape=[jax.ShapeDtypeStruct((b, length, d), _F32), jax.ShapeDtypeStruct((b, length, d), _F32),
                   jax.ShapeDtypeStruct((b, length, n), _F32), jax.ShapeDtypeStruct((b, length, n), _F32),
                   jax.ShapeDtypeStruct((b, n, d), _F32), jax.ShapeDtypeStruct((b, n, d), _F32),
                   jax.ShapeDtypeStruct((b, nt, chunk, n, tile), _F32)],
        input_output_aliases={9: 2, 10: 3},
        compiler_params=_params(),
        interpret=interpret,
        name="selective_scan_bwd_gpu",
    )(u, dt, B, C, keep, a_NxD, starts, dy, dhlast_BxNxD, zeros_n, zeros_n)
    return du, ddt, db, dc, da, dh0
