"""Attention by query and key blocks through XLA, on every platform (FlashAttention's recurrence, Dao
et al. 2022; memory-efficient attention, Rabe & Staats 2021), differentiable in q, k and v:

- forward: for each block of queries (its rows: the G heads that share a kv head), an online softmax
  over the key blocks it can see: causal masks end the loop at the block holding the query block's
  last position, and key blocks no row of the batch can see (left padding, empty cache slots) are
  skipped at both ends;
- backward (custom VJP; `gradients`, which the Pallas path shares): for each key block, the query
  blocks that can see it, recomputing the probabilities from the saved log-sum-exp (FlashAttention-2's
  backward); nothing O(L x S) is saved. The forward's output and log-sum-exp carry the checkpoint name
  CORE_NAME, so a remat policy can keep them and spare the backward pass the forward loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from common.attention.blocks import (
    LOWEST,
    Plan,
    block_rows_mask,
    dot,
    key_block_range,
    pad_keys,
    padded_mask,
    plan,
    q_block_max_pos,
    rows,
    unrows,
)
from common.attention.mask import F32, AttentionMask

CORE_NAME = "attention_core"  # checkpoint_name of the forward's output and log-sum-exp: what the backward reads
BLOCK_Q = 256  # queries per block (times G rows: the kv head's query heads share its keys)
BLOCK_K = 512  # keys per block


def forward(q_rows, k, v, mask: AttentionMask, p: Plan):
    """(out rows [Q, B, H, R, D] float32, lse [Q, B, H, R]); q_rows already scaled by 1/sqrt(d); mask padded."""
    k_first, k_last = key_block_range(mask, p)
    q_max = q_block_max_pos(mask, p) if mask.q_pos is not None else None
    _, b, nkv, r, d = q_rows.shape
    s_len = k.shape[2]  # k and v are not padded to whole blocks (a copy of a whole cache at every decode step):
    ragged = s_len % p.bk != 0  # the last block starts bk keys before the end and masks the keys it repeats

    def one_query_block(i):
        qb = q_rows[i]
        hi = k_last + 1
        if q_max is not None:
            hi = jnp.minimum(hi, q_max[i] // p.bk + 1)

        def body(j, carry):
            m, denom, acc = carry
            start = jnp.minimum(j * p.bk, s_len - p.bk) if ragged else j * p.bk
            kb = jax.lax.dynamic_slice_in_dim(k, start, p.bk, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(v, start, p.bk, axis=2)
            visible = block_rows_mask(mask, i, start, p, k_from=j * p.bk if ragged else None)
            s = jnp.where(visible, dot(qb, kb, "bhrd,bhsd->bhrs"), LOWEST)
            m_new = jnp.maximum(m, s.max(-1))
            pr = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + pr.sum(-1)
            acc = acc * corr[..., None] + dot(pr.astype(v.dtype), vb, "bhrs,bhsd->bhrd")
            return m_new, denom, acc

        init = (jnp.full((b, nkv, r), LOWEST, F32), jnp.zeros((b, nkv, r), F32), jnp.zeros((b, nkv, r, d), F32))
        m, denom, acc = jax.lax.fori_loop(k_first, jnp.maximum(hi, k_first), body, init)
        seen = denom > 0
        out = acc / jnp.where(seen, denom, 1.0)[..., None]
        return out, jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), LOWEST)

    return jax.lax.map(one_query_block, jnp.arange(p.nq))


def backward(q_rows, k, v, mask: AttentionMask, out_rows, lse, dout_rows, p: Plan):
    """(dq rows (scaled-q space), dk, dv) in float32, one key block at a time; k, v padded to whole blocks."""
    k_first, k_last = key_block_range(mask, p)
    q_max = q_block_max_pos(mask, p) if mask.q_pos is not None else None
    delta = jnp.sum(dout_rows * out_rows, axis=-1)  # [Q, B, H, R]
    dout_rows = dout_rows.astype(q_rows.dtype)
    b, nkv, _, d = k.shape

    def one_key_block(j, carry):
        dq, dk, dv = carry
        kb = jax.lax.dynamic_slice_in_dim(k, j * p.bk, p.bk, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v, j * p.bk, p.bk, axis=2)
        lo = 0 if q_max is None else jnp.sum(q_max < j * p.bk)

        def body(i, inner):
            dq, dkb, dvb = inner
            qb, dob = q_rows[i], dout_rows[i]
            s = dot(qb, kb, "bhrd,bhsd->bhrs")
            pr = jnp.where(block_rows_mask(mask, i, j * p.bk, p), jnp.exp(s - lse[i][..., None]), 0.0)
            dvb = dvb + dot(pr.astype(dob.dtype), dob, "bhrs,bhrd->bhsd")
            dp = dot(dob, vb, "bhrd,bhsd->bhrs")
            ds = (pr * (dp - delta[i][..., None])).astype(qb.dtype)
            dkb = dkb + dot(ds, qb, "bhrs,bhrd->bhsd")
            dq = dq.at[i].add(dot(ds, kb, "bhrs,bhsd->bhrd"))
            return dq, dkb, dvb

        zeros = jnp.zeros((b, nkv, p.bk, d), F32)
        dq, dkb, dvb = jax.lax.fori_loop(lo, p.nq, body, (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dkb, j * p.bk, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dvb, j * p.bk, axis=2)
        return dq, dk, dv

    init = (jnp.zeros(q_rows.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    return jax.lax.fori_loop(k_first, jnp.maximum(k_last + 1, k_first), one_key_block, init)


def gradients(residuals, dout, p: Plan):
    """(dq, dk, dv, None) from a forward's residuals (q rows, k, v, padded mask, out rows, lse; rows layout of
    plan p) and the output's cotangent: FlashAttention-2's backward."""
    q_rows, k, v, pmask, out_rows, lse = residuals
    length, d = dout.shape[1], dout.shape[4]
    dq_rows, dk, dv = backward(q_rows, pad_keys(k, p), pad_keys(v, p), pmask, out_rows, lse,
                               rows(dout.astype(F32), p), p)
    dq = unrows(dq_rows, length, p.g) * (d ** -0.5)
    k_len = k.shape[2]
    return dq.astype(dout.dtype), dk[:, :, :k_len].astype(k.dtype), dv[:, :, :k_len].astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, mask, block_q, block_k):
    return _blockwise_fwd(q, k, v, mask, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, mask, block_q, block_k):
    length, g, d = q.shape[1], q.shape[3], q.shape[4]
    p = plan(length, k.shape[2], block_q, block_k, g)
    pmask = padded_mask(mask, p)
    q_rows = rows(q * jnp.asarray(d ** -0.5, q.dtype), p)
    out_rows, lse = forward(q_rows, k, v, pmask, p)
    out_rows, lse = checkpoint_name(out_rows, CORE_NAME), checkpoint_name(lse, CORE_NAME)
    return unrows(out_rows, length, g).astype(q.dtype), (q_rows, k, v, pmask, out_rows, lse)


def _blockwise_bwd(block_q, block_k, residuals, dout):
    return gradients(residuals, dout, plan(dout.shape[1], residuals[1].shape[2], block_q, block_k, dout.shape[3]))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask, block_q: int | None = None,
                        block_k: int | None = None):
    """Attention by query and key blocks (module docstring); blocks default to BLOCK_Q and BLOCK_K (read
    at trace time).

    Matmuls run in the inputs' dtype with float32 accumulation (bfloat16 inputs: bfloat16 matmuls),
    the softmax in float32; returns [B, L, H, G, D] in q's dtype.
    """
    return _blockwise(q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask, block_q or BLOCK_Q, block_k or BLOCK_K)
