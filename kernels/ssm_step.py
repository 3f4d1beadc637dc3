"""One time step of the selective scan and of its reverse-mode recurrence, on a tile of channels,
shared by the TPU and GPU Pallas kernels (the kernels differ in how they load and store rows).

Notation: N = d_state, W = the channel tile's width. The state is laid out [N, W] (channels on
the fast axis: TPU lanes, GPU threads); a time step's inputs are rows: dt, u, dy [1, W]; B, C
columns [N, 1]; keep [1, 1] (0 where a packed document starts, else 1); A is [N, W].

Forward (mamba_ssm `selective_scan_ref`):
    h_t = keep_t exp(dt_t A) h_{t-1} + dt_t u_t B_t          y_t = sum_n C_t[n] h_t[n]

Backward, with g = dLoss/dh_t arriving from step t+1 already multiplied by step t+1's decay:
    g   += dy_t C_t
    du_t = dt_t sum_n g B_t           dB_t = sum_w g dt_t u_t      dC_t = sum_w dy_t h_t
    dt_t: u_t sum_n g B_t + sum_n g decay_t h_{t-1} A            dA += g decay_t h_{t-1} dt_t
    g   <- g decay_t  (passed to step t-1)
"""

from __future__ import annotations

import jax.numpy as jnp

_F32 = jnp.float32


def decay(a_NxW, dt_1xW, keep_1x1):
    return keep_1x1 * jnp.exp(dt_1xW * a_NxW)


def forward(h_NxW, a_NxW, dt_1xW, u_1xW, b_Nx1, keep_1x1):
    """h_t from h_{t-1}."""
    return decay(a_NxW, dt_1xW, keep_1x1) * h_NxW + (dt_1xW * u_1xW) * b_Nx1


def output(h_NxW, c_Nx1):
    """y_t [1, W]."""
    return jnp.sum(h_NxW * c_Nx1, axis=0, keepdims=True)


def backward(g_NxW, h_prev_NxW, a_NxW, dt_1xW, u_1xW, b_Nx1, c_Nx1, keep_1x1, dy_1xW):
    """One reverse step. Returns (g for step t-1, dA increment [N, W], du [1, W], d(dt) [1, W],
    dB [N, 1], dC [N, 1]); dB and dC are this tile's partial sums over its channels."""
    dec = decay(a_NxW, dt_1xW, keep_1x1)
    dtu_1xW = dt_1xW * u_1xW
    h_NxW = dec * h_prev_NxW + dtu_1xW * b_Nx1
    g_NxW = g_NxW + dy_1xW * c_Nx1
    gb_1xW = jnp.sum(g_NxW * b_Nx1, axis=0, keepdims=True)
    g_dec_h = g_NxW * dec * h_prev_NxW  # dLoss / d(dt A) of the decay term
    ddt_1xW = u_1xW * gb_1xW + jnp.sum(g_dec_h * a_NxW, axis=0, keepdims=True)
    db_Nx1 = jnp.sum(g_NxW * dtu_1xW, axis=1, keepdims=True)
    dc_Nx1 = jnp.sum(dy_1xW * h_NxW, axis=1, keepdims=True)
    return g_NxW * dec, g_dec_h * dt_1xW, dt_1xW * gb_1xW, ddt_1xW, db_Nx1, dc_Nx1
