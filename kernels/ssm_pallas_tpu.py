"""The selective scan's Pallas TPU (Mosaic) kernels: forward and recomputing backward.

Inputs arrive padded (see `kernels.ssm_pallas`): u, dt [b, L, d] and B, C [b, L, n] float32,
keep [b, L, 1], A and states transposed to [n, d] / [b, n, d] so that channels sit on the 128
lanes and the d_state rows on sublanes (a [16, 128] state tile is two vregs). L is a multiple of
the time chunk T (a multiple of 8) and d of the channel tile W (a multiple of 128).

Forward: grid (batch, d-tiles, time chunks), the time axis sequential ("arbitrary"); the [n, W]
state lives in a VMEM scratch carried from chunk to chunk. Each program walks its T steps,
writes y and saves the state at its chunk's start (the backward's only residual besides the
inputs).

Backward: grid (batch, time chunks in reverse, d-tiles), both inner axes sequential so that the
d-tiles of one chunk run back to back and add their dB and dC into the same resident [T, n]
output blocks (no [d-tiles, L, n] partials in HBM, no atomics). Per d-tile VMEM scratch carries
dLoss/dh across chunks; dA and dh0 stay resident per batch row. Each program recomputes its
chunk's T states from the saved boundary state into a [T, n, W] VMEM scratch, then runs the
reverse recurrence of `kernels.ssm_step`. Never a [b, L, d, n] array.

Rows of B and C turn into [n, 1] columns (and dB, dC columns back into rows) through a masked
reduction against an identity, built from what Mosaic lowers everywhere (iota, select, lane and
sublane sums), rather than a lane-to-sublane reshape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import ssm_step
from kernels.blocks import round_up

_F32 = jnp.float32
LANES, SUBLANES = 128, 8
CHUNK = 256  # time steps per grid step; forward and backward share it (the saved states sit at its starts)
FWD_TILE, BWD_TILE = 256, 128  # channels per program (the backward keeps more [n, W] values live)
UNROLL = 4  # time steps per loop iteration (lets the scheduler overlap a step's loads and exp)
VMEM_BUDGET = 16 * 2**20  # the smallest default scoped VMEM limit among TPU generations


def plan(length: int, d: int, n: int, chunk: int | None = None, tile: int | None = None):
    """(T, forward W, backward W, n padded) for this problem: T a multiple of 8, each W a multiple
    of 128 (the forward's a multiple of the backward's), n unpadded (it sits on sublanes)."""
    chunk, fwd_tile, bwd_tile = chunk or CHUNK, tile or FWD_TILE, tile or BWD_TILE
    if chunk % SUBLANES or fwd_tile % LANES:
        raise ValueError(f"TPU scan: chunk {chunk} must be a multiple of {SUBLANES} and tile {fwd_tile} of {LANES}")
    fwd_tile = min(fwd_tile, round_up(d, LANES))
    return min(chunk, round_up(length, SUBLANES)), fwd_tile, min(bwd_tile, fwd_tile), n


def _tile_bytes(shape) -> int:
    """VMEM bytes of a float32 block: the last two dims padded to (8, 128)."""
    *lead, rows, cols = (1,) * max(0, 2 - len(shape)) + tuple(shape)
    count = 1
    for s in lead:
        count *= s
    return count * round_up(rows, SUBLANES) * round_up(cols, LANES) * 4


def vmem_bytes(d: int, n: int, chunk: int, tile: int, backward: bool) -> int:
    """VMEM one program needs: double-buffered in/out blocks plus scratch (float32 throughout)."""
    n_tiles = round_up(d, tile) // tile
    seq_d, seq_n, keep, a, state = (chunk, tile), (chunk, n), (chunk, 1), (n, tile), (n, tile)
    if not backward:
        blocks = [seq_d, seq_d, seq_n, seq_n, keep, a, state] + [seq_d, state, state]
        scratch = [state]
    else:
        blocks = ([seq_d, seq_d, seq_n, seq_n, keep, a, state, seq_d, state]
                  + [seq_d, seq_d, seq_n, seq_n, (n_tiles, n, tile), (n_tiles, n, tile)])
        scratch = [(n_tiles, n, tile), (chunk, n, tile)]
    return 2 * sum(_tile_bytes(s) for s in blocks) + sum(_tile_bytes(s) for s in scratch)


def _compiler_params(semantics, vmem: int):
    # room above our own blocks for Mosaic's internal scratch and spills; within every TPU's VMEM
    limit = min(max(VMEM_BUDGET, 2 * vmem), 48 * 2**20)
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _eye(n):
    return jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _col(row_1xN, eye_NxN):
    return jnp.sum(jnp.where(eye_NxN, row_1xN, 0.0), axis=1, keepdims=True)


def _row(col_Nx1, eye_NxN):
    return jnp.sum(jnp.where(eye_NxN, col_Nx1, 0.0), axis=0, keepdims=True)


def _step_inputs(t, dt_ref, u_ref, b_ref, c_ref, keep_ref, eye):
    row = lambda ref: ref[pl.ds(t, 1), :]  # noqa: E731
    return row(dt_ref), row(u_ref), _col(row(b_ref), eye), _col(row(c_ref), eye), row(keep_ref)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
def _fwd_kernel(u_ref, dt_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref, y_ref, hs_ref, hlast_ref, h_scr, *, chunk):
    @pl.when(pl.program_id(2) == 0)
    def _():
        h_scr[...] = h0_ref[...]

    h_NxW = h_scr[...]
    hs_ref[...] = h_NxW  # the state at this chunk's start
    a_NxW = a_ref[...]
    eye = _eye(a_NxW.shape[0])

    def step(t, h):
        dt, u, b, c, keep = _step_inputs(t, dt_ref, u_ref, b_ref, c_ref, keep_ref, eye)
        h = ssm_step.forward(h, a_NxW, dt, u, b, keep)
        y_ref[pl.ds(t, 1), :] = ssm_step.output(h, c)
        return h

    h_NxW = jax.lax.fori_loop(0, chunk, step, h_NxW, unroll=min(UNROLL, chunk))
    h_scr[...] = h_NxW
    hlast_ref[...] = h_NxW


def forward(u, dt, B, C, keep, a_NxD, h0_BxNxD, chunk, tile, interpret):
    """(y [b, L, d], chunk-start states [b, L/T, n, d], last state [b, n, d]), all float32."""
    b, length, d = u.shape
    n = a_NxD.shape[0]
    nc, nt = length // chunk, d // tile
    seq_d = pl.BlockSpec((None, chunk, tile), lambda i, j, k: (i, k, j))
    seq_n = pl.BlockSpec((None, chunk, n), lambda i, j, k: (i, k, 0))
    keep_s = pl.BlockSpec((None, chunk, 1), lambda i, j, k: (i, k, 0))
    a_s = pl.BlockSpec((n, tile), lambda i, j, k: (0, j))
    state = pl.BlockSpec((None, n, tile), lambda i, j, k: (i, 0, j))
    starts = pl.BlockSpec((None, None, n, tile), lambda i, j, k: (i, k, 0, j))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=chunk),
        grid=(b, nt, nc),
        in_specs=[seq_d, seq_d, seq_n, seq_n, keep_s, a_s, state],
        out_specs=[seq_d, starts, state],
        out_shape=[jax.ShapeDtypeStruct((b, length, d), _F32), jax.ShapeDtypeStruct((b, nc, n, d), _F32),
                   jax.ShapeDtypeStruct((b, n, d), _F32)],
        scratch_shapes=[pltpu.VMEM((n, tile), _F32)],
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary"),
                                         vmem_bytes(d, n, chunk, tile, backward=False)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="selective_scan_fwd_tpu",
    )(u, dt, B, C, keep, a_NxD, h0_BxNxD)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
def _bwd_kernel(u_ref, dt_ref, b_ref, c_ref, keep_ref, a_ref, hs_ref, dy_ref, dhlast_ref,
                du_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref, g_scr, states_scr, *, chunk):
    k, j = pl.program_id(1), pl.program_id(2)  # k-th chunk from the end, d-tile j
    a_NxW = a_ref[...]
    eye = _eye(a_NxW.shape[0])

    @pl.when(k == 0)
    def _():
        g_scr[j] = dhlast_ref[...]
        da_ref[j] = jnp.zeros_like(a_NxW)

    @pl.when(j == 0)
    def _():
        db_ref[...] = jnp.zeros_like(db_ref)
        dc_ref[...] = jnp.zeros_like(dc_ref)

    def recompute(t, h):  # states_scr[t] = the state before step t
        states_scr[t] = h
        dt, u, b, _, keep = _step_inputs(t, dt_ref, u_ref, b_ref, c_ref, keep_ref, eye)
        return ssm_step.forward(h, a_NxW, dt, u, b, keep)

    jax.lax.fori_loop(0, chunk, recompute, hs_ref[...], unroll=min(UNROLL, chunk))

    def reverse(r, carry):
        g, da = carry
        t = chunk - 1 - r
        dt, u, b, c, keep = _step_inputs(t, dt_ref, u_ref, b_ref, c_ref, keep_ref, eye)
        g, da_inc, du, ddt, db, dc = ssm_step.backward(g, states_scr[t], a_NxW, dt, u, b, c, keep,
                                                        dy_ref[pl.ds(t, 1), :])
        du_ref[pl.ds(t, 1), :] = du
        ddt_ref[pl.ds(t, 1), :] = ddt
        db_ref[pl.ds(t, 1), :] += _row(db, eye)
        dc_ref[pl.ds(t, 1), :] += _row(dc, eye)
        return g, da + da_inc

    g, da = jax.lax.fori_loop(0, chunk, reverse, (g_scr[j], jnp.zeros_like(a_NxW)), unroll=min(UNROLL, chunk))
    g_scr[j] = g
    da_ref[j] += da

    @pl.when(k == pl.num_programs(1) - 1)
    def _():
        dh0_ref[j] = g


def backward(u, dt, B, C, keep, a_NxD, starts, dy, dhlast_BxNxD, chunk, tile, interpret):
    """(du, d(dt) [b, L, d], dB, dC [b, L, n], dA partial per batch row [b, n, d], dh0 [b, n, d])."""
    b, length, d = u.shape
    n = a_NxD.shape[0]
    nc, nt = length // chunk, d // tile
    rev = lambda k: nc - 1 - k  # noqa: E731
    seq_d = pl.BlockSpec((None, chunk, tile), lambda i, k, j: (i, rev(k), j))
    seq_n = pl.BlockSpec((None, chunk, n), lambda i, k, j: (i, rev(k), 0))
    keep_s = pl.BlockSpec((None, chunk, 1), lambda i, k, j: (i, rev(k), 0))
    a_s = pl.BlockSpec((n, tile), lambda i, k, j: (0, j))
    start = pl.BlockSpec((None, None, n, tile), lambda i, k, j: (i, rev(k), 0, j))
    state = pl.BlockSpec((None, n, tile), lambda i, k, j: (i, 0, j))
    per_row = pl.BlockSpec((None, nt, n, tile), lambda i, k, j: (i, 0, 0, 0))  # resident per batch row
    du, ddt, db, dc, da, dh0 = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk),
        grid=(b, nc, nt),
        in_specs=[seq_d, seq_d, seq_n, seq_n, keep_s, a_s, start, seq_d, state],
        out_specs=[seq_d, seq_d, seq_n, seq_n, per_row, per_row],
        out_shape=[jax.ShapeDtypeStruct((b, length, d), _F32), jax.ShapeDtypeStruct((b, length, d), _F32),
                   jax.ShapeDtypeStruct((b, length, n), _F32), jax.ShapeDtypeStruct((b, length, n), _F32),
                   jax.ShapeDtypeStruct((b, nt, n, tile), _F32), jax.ShapeDtypeStruct((b, nt, n, tile), _F32)],
        scratch_shapes=[pltpu.VMEM((nt, n, tile), _F32), pltpu.VMEM((chunk, n, tile), _F32)],
        compiler_params=_compiler_params(("parallel", "arbitrary", "arbitrary"),
                                         vmem_bytes(d, n, chunk, tile, backward=True)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="selective_scan_bwd_tpu",
    )(u, dt, B, C, keep, a_NxD, starts, dy, dhlast_BxNxD)
    untile = lambda x: jnp.moveaxis(x, 1, 2).reshape(b, n, d)  # noqa: E731  [b, nt, n, W] -> [b, n, d]
    return du, ddt, db, dc, untile(da), untile(dh0)
