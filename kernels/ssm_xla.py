"""The selective-scan recurrence in plain XLA: reference, fused scan, associative, chunked.

Every function here takes u [b, L, d], dt [b, L, d] (float32, bias and softplus applied),
A [d, n], B, C [b, L, n], h0 [b, d, n] (float32) and reset [b, L] bool or None, and returns
(y [b, L, d] float32 without the D skip or z gate, h_last [b, d, n] float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import ssm_step

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


def _to_chunks(x, n_chunks, t, fill=0.0):  # [b, L, ...] -> [n_chunks, T, b, ...]
    pad = n_chunks * t - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = jnp.moveaxis(x, 1, 0)
    return x.reshape((n_chunks, t) + x.shape[1:])


def _from_chunks(x, length):  # [n_chunks, T, b, ...] -> [b, L, ...]
    x = x.reshape((-1,) + x.shape[2:])[:length]
    return jnp.moveaxis(x, 0, 1)


# ------------------------------------------------------------------------------------------------
# Chunked associative: an outer lax.scan over chunks of T steps carries the state; each chunk's
# body is wrapped in jax.checkpoint, so autodiff keeps only the chunk-boundary states and
# recomputes one chunk at a time in the backward pass.
# ------------------------------------------------------------------------------------------------
def _chunk_parallel(A):
    def run(h_BxDxN, xs):
        u, dt, b, c, keep = xs  # [T, b, d] [T, b, d] [T, b, n] [T, b, n] [T, b] or None
        dA, dBu = _discretise(u, dt, A, b, None if keep is None else keep == 0)
        dBu = dBu.at[0].add(dA[0] * h_BxDxN)
        _, h_TxBxDxN = jax.lax.associative_scan(_combine, (dA, dBu), axis=0)
        return h_TxBxDxN[-1], jnp.einsum("tbdn,tbn->tbd", h_TxBxDxN, c)

    return run


def _run_chunks(u, dt, A, B, C, h0, reset, chunk, make_chunk_fn):
    length = u.shape[1]
    t = max(1, min(chunk, length))
    n = -(-length // t)
    # padded steps are no-ops: dt = 0 leaves h unchanged and keep = 1 does not reset it
    keep = None if reset is None else _to_chunks((~reset).astype(_F32), n, t, fill=1.0)
    xs = (_to_chunks(u.astype(_F32), n, t), _to_chunks(dt, n, t), _to_chunks(B.astype(_F32), n, t),
          _to_chunks(C.astype(_F32), n, t), keep)
    run_chunk = jax.checkpoint(make_chunk_fn(A.astype(_F32)), prevent_cse=False)
    h, y = jax.lax.scan(run_chunk, h0, xs)  # y: [n_chunks, T, b, d]
    return _from_chunks(y, length), h


def scan_chunked(u, dt, A, B, C, h0, reset, chunk=64):
    """Associative scan inside chunks of `chunk` steps, state carried across chunks: parallel within
    a chunk, memory bounded by one chunk's [b, chunk, d, n]."""
    return _run_chunks(u, dt, A, B, C, h0, reset, chunk, _chunk_parallel)


# ------------------------------------------------------------------------------------------------
# Fused sequential scan with a hand-written VJP. Forward: a loop over chunks of T steps, an inner loop
# discretising inside each step; it saves only the state at each chunk's start. Backward: chunks in reverse;
# each recomputes its T states from the saved one, then runs the reverse-time recurrence
# g_t = C_t dy_t + keep_{t+1} exp(dt_{t+1} A) g_{t+1} (the same algebra as the Pallas kernel's backward),
# which saves the work autodiff through a rematerialised scan repeats.
# Each step reads its inputs and writes its outputs at its index of the time axis of the [b, L, ...] arrays,
# as they lie: a time-major copy of each (what lax.scan over them takes) is a transpose per array and pass,
# which XLA:CPU runs at a few GB/s.
# States lie [b, n, d] (A as A^T [n, d]) in both passes: each step's exp and update run along the contiguous
# channels d, where [b, d, n] put the 16-wide state axis minor (2.0x the time of a forward step on the CPU).
# Every per-step sum in the backward is a dot XLA takes as its operands lie (batch b, contracting n or d), none
# with the channels as a batch dimension, which XLA:CPU served by transposing a state every step: sum_n s A is
# sum_n (s A) x 1, and dA's sum over the batch is left to the end (the carry holds its [b, n, d] terms).
# h0 and h_last are [b, d, n].
# ------------------------------------------------------------------------------------------------


def _ch(x_BxD):  # a per-channel row against a [b, n, d] state
    return x_BxD[:, None, :]


def _st(x_BxN):  # a per-state-index row against a [b, n, d] state
    return x_BxN[:, :, None]


def _state(h):  # [b, d, n] <-> [b, n, d]
    return jnp.swapaxes(h, -1, -2)


def _sum_n(s_BxNxD, x_BxN):  # sum_n s x -> [b, d]
    return jnp.einsum("bn,bnd->bd", x_BxN, s_BxNxD)


def _sum_d(s_BxNxD, x_BxD):  # sum_d s x -> [b, n]
    return jnp.einsum("bnd,bd->bn", s_BxNxD, x_BxD)


def _decay(a_NxD, dt_t, keep_t):  # keep_t exp(dt_t A) [b, n, d]: the kernels' step algebra, batched
    return ssm_step.decay(a_NxD, _ch(dt_t), keep_t[:, None, None])


def _step(a_NxD, h, u_t, dt_t, b_t, keep_t):
    """h_t from h_{t-1}."""
    return ssm_step.forward(h, a_NxD, _ch(dt_t), _ch(u_t), _st(b_t), keep_t[:, None, None])


def _at(x, i):  # step i of a [b, L, ...] input
    return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)


def _put(buf, x, i, axis=1):  # x written as step i of a [b, L, ...] (or, axis 0, [T, ...]) buffer
    return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, axis)


def _forward(u, dt, A, B, C, keep, h0, chunk):
    """(y, h_last [b, d, n], the states at each chunk's start [n_chunks, b, n, d])."""
    length = u.shape[1]
    n_chunks = -(-length // chunk)
    a = A.T

    def step(i, carry):
        h, y = carry
        h = _step(a, h, _at(u, i), _at(dt, i), _at(B, i), _at(keep, i))
        return h, _put(y, _sum_n(h, _at(C, i)), i)

    def chunk_body(c, carry):
        h_start, y, hs = carry
        h, y = jax.lax.fori_loop(c * chunk, jnp.minimum((c + 1) * chunk, length), step, (h_start, y))
        return h, y, _put(hs, h_start, c, axis=0)

    h = _state(h0)
    hs = jnp.zeros((n_chunks,) + h.shape, _F32)
    h_last, y, hs = jax.lax.fori_loop(0, n_chunks, chunk_body, (h, jnp.zeros_like(u), hs))
    return y, _state(h_last), hs


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def fused_core(u, dt, A, B, C, keep, h0, chunk):
    # without a gradient no chunk-start state is needed (the chunks bound what the backward holds): one chunk of
    # every step keeps no [n_chunks, b, n, d] buffer; as fast as sqrt(L) chunks (within 6% either way, 64 to 2,048
    # steps, on the CPU)
    y, h_last, _ = _forward(u, dt, A, B, C, keep, h0, u.shape[1])
    return y, h_last


def _fwd(u, dt, A, B, C, keep, h0, chunk):
    y, h_last, hs = _forward(u, dt, A, B, C, keep, h0, chunk)
    return (y, h_last), (u, dt, A, B, C, keep, hs)


def _bwd(chunk, res, cts):
    u, dt, A, B, C, keep, hs = res  # (hs [n_chunks, b, n, d])
    dy, dh_last = cts
    a = A.T
    length = u.shape[1]
    n_chunks = hs.shape[0]
    ones_BxN = jnp.ones(B.shape[:1] + B.shape[2:], _F32)

    def chunk_bwd(j, carry):
        (g, da), grads, h_buf = carry
        c = n_chunks - 1 - j
        start = c * chunk
        steps = jnp.minimum(chunk, length - start)

        def fstep(t, carry):  # recompute the chunk's states (h_buf[t + 1] = h_t, h_buf[0] its start)
            h, h_buf = carry
            h = _step(a, h, _at(u, start + t), _at(dt, start + t), _at(B, start + t), _at(keep, start + t))
            return h, _put(h_buf, h, t + 1, 0)

        h_start = jax.lax.dynamic_index_in_dim(hs, c, keepdims=False)
        _, h_buf = jax.lax.fori_loop(0, steps, fstep, (h_start, _put(h_buf, h_start, 0, 0)))

        def bstep(r, carry):
            (g, da), (du, ddt, db, dc) = carry
            t = steps - 1 - r
            i = start + t
            u_t, dt_t, b_t, c_t, dy_t = (_at(x, i) for x in (u, dt, B, C, dy))
            h_prev, h_t = (jax.lax.dynamic_index_in_dim(h_buf, k, keepdims=False) for k in (t, t + 1))
            decay = _decay(a, dt_t, _at(keep, i))  # (recomputed: a [T, b, n, d] buffer of them cost more)
            g = g + _ch(dy_t) * _st(c_t)
            gb = _sum_n(g, b_t)
            gdh = g * decay * h_prev
            grads = (_put(du, dt_t * gb, i), _put(ddt, u_t * gb + _sum_n(gdh * a, ones_BxN), i),
                     _put(db, _sum_d(g, dt_t * u_t), i), _put(dc, _sum_d(h_t, dy_t), i))
            return (g * decay, da + gdh * _ch(dt_t)), grads

        carry = jax.lax.fori_loop(0, steps, bstep, ((g, da), grads))
        return carry + (h_buf,)

    g = _state(dh_last)
    h_buf = jnp.zeros((chunk + 1,) + g.shape, _F32)
    grads = (jnp.zeros_like(u), jnp.zeros_like(dt), jnp.zeros_like(B), jnp.zeros_like(C))
    init = ((g, jnp.zeros_like(g)), grads, h_buf)
    (g, da), (du, ddt, db, dc), _ = jax.lax.fori_loop(0, n_chunks, chunk_bwd, init)
    return du, ddt, da.sum(0).T, db, dc, jnp.zeros_like(keep), _state(g)


fused_core.defvjp(_fwd, _bwd)


def scan_fused(u, dt, A, B, C, h0, reset, chunk=None):
    """Sequential scan, never more than one chunk of [b, n, d] states alive; chunks of about
    sqrt(L) steps balance the saved boundary states against the per-chunk recompute buffer."""
    chunk = max(1, min(chunk or int(round(u.shape[1] ** 0.5)), u.shape[1]))
    keep = jnp.ones(u.shape[:2], _F32) if reset is None else (~reset).astype(_F32)
    return fused_core(u.astype(_F32), dt, A.astype(_F32), B.astype(_F32), C.astype(_F32), keep, h0, chunk)
