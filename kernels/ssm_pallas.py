"""Selective scan as Pallas kernels with a recomputing custom VJP (the mamba_ssm CUDA kernel's plan).

Two kernel families compute the same thing, each written for what its compiler accepts:
  tpu  Mosaic TPU (`kernels.ssm_pallas_tpu`): grid (batch, d-tiles, time chunks), time sequential,
       the state carried in VMEM scratch; blocks of (8k, 128k).
  gpu  Triton (`kernels.ssm_pallas_gpu`): one program per (batch, d-tile) walking all of time with
       the state in registers, rows loaded from HBM.
Both save only the state at each time chunk's start in the forward pass; the backward recomputes a
chunk's states from it and runs the reverse recurrence (`kernels.ssm_step`): never a
[batch, length, d_inner, d_state] array, forward or backward.

This module pads and lays out the operands (channels on the fast axis: A [n, d], states
[b, n, d]), runs the chosen family compiled, or in interpret mode when tracing for a CPU
(`kernels.platform`; the TPU family under `pltpu.InterpretParams`, which models its sequential
grid and VMEM scratch), and wires the custom VJP. The D skip, z gate, delta bias and softplus stay
outside (plain jnp, autodiffed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import ssm_pallas_gpu, ssm_pallas_tpu
from kernels.blocks import round_up
from kernels.platform import current_platform, interpret_mode

_F32 = jnp.float32
FAMILIES = {"tpu": ssm_pallas_tpu, "gpu": ssm_pallas_gpu}


def _layout(family, u, dt, A, B, C, keep, h0, chunk, tile):
    """Pads to whole chunks, tiles and (GPU) a power-of-two n; transposes A and h0 to [n, d].
    Padded steps and channels have dt = 0, keep = 1 and B = 0: they leave the state untouched."""
    b, length, d = u.shape
    n = A.shape[1]
    t, fwd_tile, bwd_tile, n_pad = FAMILIES[family].plan(length, d, n, chunk, tile)
    lp, dp = round_up(length, t), round_up(d, max(fwd_tile, bwd_tile))
    dtype = _F32 if family == "tpu" else None  # Mosaic gets float32 rows; Triton converts on load
    cast = lambda x: x if dtype is None else x.astype(dtype)  # noqa: E731

    def seq(x, width, fill=0.0):
        return jnp.pad(cast(x), [(0, 0), (0, lp - length), (0, width - x.shape[2])], constant_values=fill)

    a_NxD = jnp.pad(A.astype(_F32), [(0, dp - d), (0, n_pad - n)]).T
    h0_BxNxD = jnp.pad(jnp.swapaxes(h0.astype(_F32), 1, 2), [(0, 0), (0, n_pad - n), (0, dp - d)])
    padded = (seq(u, dp), seq(dt.astype(_F32), dp), seq(B, n_pad), seq(C, n_pad), seq(keep[..., None], 1, 1.0),
              a_NxD, h0_BxNxD)
    return padded, (t, fwd_tile, bwd_tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core(u, dt, A, B, C, keep, h0, family, chunk, tile, interpret):
    return _core_fwd(u, dt, A, B, C, keep, h0, family, chunk, tile, interpret)[0]


def _core_fwd(u, dt, A, B, C, keep, h0, family, chunk, tile, interpret):
    b, length, d = u.shape
    n = A.shape[1]
    padded, (t, fwd_tile, _) = _layout(family, u, dt, A, B, C, keep, h0, chunk, tile)
    y, starts, h_last = FAMILIES[family].forward(*padded, t, fwd_tile, interpret)
    out = (y[:, :length, :d], jnp.swapaxes(h_last, 1, 2)[:, :d, :n])
    return out, (u, dt, A, B, C, keep, starts)


def _core_bwd(family, chunk, tile, interpret, res, cotangents):
    u, dt, A, B, C, keep, starts = res
    dy, dh_last = cotangents
    b, length, d = u.shape
    n = A.shape[1]
    padded, (t, _, bwd_tile) = _layout(family, u, dt, A, B, C, keep, dh_last, chunk, tile)
    up, dtp, bp, cp, kp, a_NxD, dhlast_BxNxD = padded
    dyp = jnp.pad(dy.astype(_F32), [(0, 0), (0, up.shape[1] - length), (0, up.shape[2] - d)])
    du, ddt, db, dc, da, dh0 = FAMILIES[family].backward(up, dtp, bp, cp, kp, a_NxD, starts, dyp, dhlast_BxNxD,
                                                         t, bwd_tile, interpret)
    return (du[:, :length, :d].astype(u.dtype), ddt[:, :length, :d].astype(dt.dtype),
            da.sum(0).T[:d, :n].astype(A.dtype), db[:, :length, :n].astype(B.dtype),
            dc[:, :length, :n].astype(C.dtype), jnp.zeros_like(keep), jnp.swapaxes(dh0, 1, 2)[:, :d, :n])


_core.defvjp(_core_fwd, _core_bwd)


def default_family() -> str:
    """The kernel family for the platform being traced for; on a CPU the GPU family's body runs
    in Pallas's interpreter (the cheaper one)."""
    return "tpu" if current_platform() == "tpu" else "gpu"


def scan_pallas(u, dt, A, B, C, h0, reset, family=None, chunk=None, tile=None):
    """Pallas selective scan (see the module docstring); compiled unless tracing for a CPU."""
    family = family or default_family()
    if family not in FAMILIES:
        raise ValueError(f"Pallas scan family {family!r}; expected one of {tuple(FAMILIES)}")
    keep = jnp.ones(u.shape[:2], _F32) if reset is None else (~reset).astype(_F32)
    return _core(u, dt, A, B, C, keep, h0, family, chunk, tile, interpret_mode())
