"""Softmax attention without a [queries, keys] array, on grouped-query layouts.

q [B, L, V, G, D] (V kv heads, G query heads per kv head), k and v [B, V, S, D] (heads-major, as
transformers' caches and the kernels keep them: a key block of one head is contiguous). Which keys a
query sees is described by an `AttentionMask` (positions, the padding mask and segment ids); the
attention loops build each [q block, k block] piece of the mask from it where they need it, so
memory is O(L + S) whatever the lengths (FlashAttention's recurrence, Dao et al. 2022; memory-
efficient attention, Rabe & Staats 2021):

- forward: for each block of queries (the G heads that share a kv head folded into its rows, so
  one matmul serves them all), an online softmax over the key blocks it can see: causal masks end
  the loop at the block holding the query block's last position, and key blocks no row of the batch
  can see (left padding, empty cache slots) are skipped at both ends;
- backward (custom VJP): for each key block, the query blocks that can see it, recomputing the
  probabilities from the saved log-sum-exp (FlashAttention-2's backward); nothing O(L x S) is saved.

`attention` picks the implementation: this blockwise path through XLA on CPU, the Pallas forward
kernel of `kernels.flash_attention` on GPU and TPU (differentiated through the same blockwise
backward).
`common.cached_attention` is the decode step's path over a cache (few queries, the cache written in place).
`reference_attention` materialises the mask and the scores: it is the tests' reference, never a model's path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import flash_attention
from kernels.platform import current_platform, interpret_mode, log_once

_F32 = jnp.float32
_LOWEST = float(jnp.finfo(_F32).min)  # a finite minimum (not -inf) keeps fully masked rows free of NaN

BLOCK_Q = 256  # queries per block (times G rows: the kv head's query heads share its keys)
BLOCK_K = 512  # keys per block


class AttentionMask(NamedTuple):
    """Which keys each query sees, in O(L + S) arrays.

    Key s is visible to query l of row b iff k_valid[b, s], and (causal) s <= q_pos[l], and (packed
    rows) q_segment[b, l] == k_segment[b, s]. Key s sits at position s (cache slot s).
    """

    k_valid: jax.Array  # [B, S] bool: real keys (left padding and unwritten cache slots are not)
    q_pos: jax.Array | None = None  # [L] int32, q_pos[0] + arange(L) (the kernels assume it): causal;
    # None: bidirectional (BERT)
    q_segment: jax.Array | None = None  # [B, L] document ids of packed rows
    k_segment: jax.Array | None = None  # [B, S]

    @classmethod
    def causal(cls, valid_BxL, segment_ids_BxL=None) -> AttentionMask:
        """A causal LM over whole rows: query l sees real keys 0..l (of its own document)."""
        length = valid_BxL.shape[1]
        return cls(valid_BxL.astype(bool), jnp.arange(length, dtype=jnp.int32), segment_ids_BxL, segment_ids_BxL)

    @classmethod
    def cached(cls, key_valid_BxS, index, length: int) -> AttentionMask:
        """`length` new tokens written at cache slot `index` of a cache whose real slots are key_valid."""
        return cls(key_valid_BxS.astype(bool), index + jnp.arange(length, dtype=jnp.int32))

    @classmethod
    def bidirectional(cls, valid_BxL) -> AttentionMask:
        """An encoder (BERT): every query sees every real key."""
        return cls(valid_BxL.astype(bool))

    def block(self, q_start, q_len: int, k_start, k_len: int):
        """The [B, q_len, k_len] piece of the mask at (q_start, k_start)."""
        ok = jax.lax.dynamic_slice_in_dim(self.k_valid, k_start, k_len, axis=1)[:, None, :]
        if self.q_pos is not None:
            k_pos = k_start + jnp.arange(k_len, dtype=jnp.int32)
            q_pos = jax.lax.dynamic_slice_in_dim(self.q_pos, q_start, q_len)
            ok = ok & (k_pos[None, None, :] <= q_pos[None, :, None])
        if self.q_segment is not None:
            qs = jax.lax.dynamic_slice_in_dim(self.q_segment, q_start, q_len, axis=1)
            ks = jax.lax.dynamic_slice_in_dim(self.k_segment, k_start, k_len, axis=1)
            ok = ok & (qs[:, :, None] == ks[:, None, :])
        return ok

    def dense(self, q_len: int):
        """The whole [B, L, S] mask (tests' reference only)."""
        s = self.k_valid.shape[1]
        return jnp.broadcast_to(self.block(0, q_len, 0, s), (self.k_valid.shape[0], q_len, s))


def reference_attention(q_BxLxVxGxD, k_BxVxSxD, v_BxVxSxD, mask: AttentionMask):
    """softmax(q k^T / sqrt(d)) v in float32 with the scores and mask materialised: the reference
    the tests hold the blockwise and kernel paths to (fully masked rows: the mean of v)."""
    hd = q_BxLxVxGxD.shape[-1]
    logits = jnp.einsum("bqkgd,bksd->bkgqs", q_BxLxVxGxD.astype(_F32), k_BxVxSxD.astype(_F32)) * (hd ** -0.5)
    logits = jnp.where(mask.dense(q_BxLxVxGxD.shape[1])[:, None, None], logits, _LOWEST)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgqs,bksd->bqkgd", probs, v_BxVxSxD.astype(_F32)).astype(q_BxLxVxGxD.dtype)


# ------------------------------------------------------------------------------------------------------------------
# The blockwise path (XLA: every platform)


class _Plan(NamedTuple):
    """Static tiling of one call."""

    bq: int  # queries per block
    bk: int  # keys per block
    nq: int  # query blocks
    nk: int  # key blocks


def _plan(q_len: int, k_len: int, block_q: int, block_k: int) -> _Plan:
    bq, bk = min(block_q, q_len), min(block_k, k_len)
    return _Plan(bq, bk, -(-q_len // bq), -(-k_len // bk))


def _padded_mask(mask: AttentionMask, p: _Plan) -> AttentionMask:
    """Pads the mask to whole blocks: extra keys invalid, extra queries copies of the last one."""
    q_pad = p.nq * p.bq - (mask.q_pos.shape[0] if mask.q_pos is not None else 0)
    k_pad = p.nk * p.bk - mask.k_valid.shape[1]

    def pad(x, n, axis, mode="constant"):
        if x is None or n == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n)
        return jnp.pad(x, widths, mode=mode)

    q_pad_seg = p.nq * p.bq - mask.q_segment.shape[1] if mask.q_segment is not None else 0
    return AttentionMask(pad(mask.k_valid, k_pad, 1), pad(mask.q_pos, q_pad, 0, "edge"),
                         pad(mask.q_segment, q_pad_seg, 1, "edge"), pad(mask.k_segment, k_pad, 1))


def _key_block_range(mask: AttentionMask, p: _Plan):
    """[first, last] key blocks holding a key some row can see (empty range: first > last)."""
    any_valid = jnp.any(mask.k_valid, axis=0)
    idx = jnp.arange(any_valid.shape[0], dtype=jnp.int32)
    first = jnp.min(jnp.where(any_valid, idx, any_valid.shape[0])) // p.bk
    last = jnp.max(jnp.where(any_valid, idx, -1))
    return first, jnp.where(last < 0, -1, last // p.bk)


def _q_block_max_pos(mask: AttentionMask, p: _Plan):
    """[nq] the last (largest) position of each query block."""
    return mask.q_pos.reshape(p.nq, p.bq)[:, -1]


def _rows(x_BxLxVxGxD, p: _Plan):
    """[B, L, V, G, D] -> [nq, B, V, bq * G, D]: query blocks, each kv head's G query heads in the rows."""
    b, length, nkv, g, d = x_BxLxVxGxD.shape
    x = jnp.pad(x_BxLxVxGxD, [(0, 0), (0, p.nq * p.bq - length), (0, 0), (0, 0), (0, 0)])
    return x.reshape(b, p.nq, p.bq, nkv, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(p.nq, b, nkv, p.bq * g, d)


def _unrows(x_NxBxVxRxD, length: int, g: int):
    nq, b, nkv, r, d = x_NxBxVxRxD.shape
    x = x_NxBxVxRxD.reshape(nq, b, nkv, r // g, g, d).transpose(1, 0, 3, 2, 4, 5)
    return x.reshape(b, nq * (r // g), nkv, g, d)[:, :length]


def _pad_keys(x_BxVxSxD, p: _Plan):
    return jnp.pad(x_BxVxSxD, [(0, 0), (0, 0), (0, p.nk * p.bk - x_BxVxSxD.shape[2]), (0, 0)])


def _block_rows_mask(mask: AttentionMask, i, k_start, p: _Plan, g: int, k_from=None):
    """The mask of query block i against the bk keys from `k_start`, in the row layout: [B, 1, bq * G, bk];
    with `k_from`, keys before it are hidden too (a last block moved back to end at the last key)."""
    m = mask.block(i * p.bq, p.bq, k_start, p.bk)
    if k_from is not None:
        m = m & (k_start + jnp.arange(p.bk, dtype=jnp.int32) >= k_from)[None, None, :]
    return jnp.broadcast_to(m[:, :, None, :], (m.shape[0], p.bq, g, p.bk)).reshape(m.shape[0], 1, p.bq * g, p.bk)


def _dot(a, b, spec):
    return jnp.einsum(spec, a, b, preferred_element_type=_F32)


def _forward(q_rows, k, v, mask: AttentionMask, p: _Plan, g: int):
    """(out rows [nq, B, V, R, D] float32, lse [nq, B, V, R]); q_rows already scaled by 1/sqrt(d)."""
    k_first, k_last = _key_block_range(mask, p)
    q_max = _q_block_max_pos(mask, p) if mask.q_pos is not None else None
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
            visible = _block_rows_mask(mask, i, start, p, g, k_from=j * p.bk if ragged else None)
            s = jnp.where(visible, _dot(qb, kb, "bvrd,bvsd->bvrs"), _LOWEST)
            m_new = jnp.maximum(m, s.max(-1))
            pr = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + pr.sum(-1)
            acc = acc * corr[..., None] + _dot(pr.astype(v.dtype), vb, "bvrs,bvsd->bvrd")
            return m_new, denom, acc

        init = (jnp.full((b, nkv, r), _LOWEST, _F32), jnp.zeros((b, nkv, r), _F32), jnp.zeros((b, nkv, r, d), _F32))
        m, denom, acc = jax.lax.fori_loop(k_first, jnp.maximum(hi, k_first), body, init)
        seen = denom > 0
        out = acc / jnp.where(seen, denom, 1.0)[..., None]
        return out, jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), _LOWEST)

    return jax.lax.map(one_query_block, jnp.arange(p.nq))


def _backward(q_rows, k, v, mask: AttentionMask, out_rows, lse, dout_rows, p: _Plan, g: int):
    """(dq rows (scaled-q space), dk, dv) in float32, one key block at a time."""
    k_first, k_last = _key_block_range(mask, p)
    q_max = _q_block_max_pos(mask, p) if mask.q_pos is not None else None
    delta = jnp.sum(dout_rows * out_rows, axis=-1)  # [nq, B, V, R]
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
            s = _dot(qb, kb, "bvrd,bvsd->bvrs")
            pr = jnp.where(_block_rows_mask(mask, i, j * p.bk, p, g), jnp.exp(s - lse[i][..., None]), 0.0)
            dvb = dvb + _dot(pr.astype(dob.dtype), dob, "bvrs,bvrd->bvsd")
            dp = _dot(dob, vb, "bvrd,bvsd->bvrs")
            ds = (pr * (dp - delta[i][..., None])).astype(qb.dtype)
            dkb = dkb + _dot(ds, qb, "bvrs,bvrd->bvsd")
            dq = dq.at[i].add(_dot(ds, kb, "bvrs,bvsd->bvrd"))
            return dq, dkb, dvb

        zeros = jnp.zeros((b, nkv, p.bk, d), _F32)
        dq, dkb, dvb = jax.lax.fori_loop(lo, p.nq, body, (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dkb, j * p.bk, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dvb, j * p.bk, axis=2)
        return dq, dk, dv

    init = (jnp.zeros(q_rows.shape, _F32), jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
    return jax.lax.fori_loop(k_first, jnp.maximum(k_last + 1, k_first), one_key_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, mask, block_q, block_k):
    return _blockwise_fwd(q, k, v, mask, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, mask, block_q, block_k):
    length, g, d = q.shape[1], q.shape[3], q.shape[4]
    p = _plan(length, k.shape[2], block_q, block_k)
    pmask = _padded_mask(mask, p)
    q_rows = _rows(q * jnp.asarray(d ** -0.5, q.dtype), p)
    out_rows, lse = _forward(q_rows, k, v, pmask, p, g)
    return _unrows(out_rows, length, g).astype(q.dtype), (q_rows, k, v, pmask, out_rows, lse)


def _blockwise_bwd(block_q, block_k, residuals, dout):
    return _gradients(residuals, dout, _plan(dout.shape[1], residuals[1].shape[2], block_q, block_k))


def _gradients(residuals, dout, p: _Plan | flash_attention.Plan):
    """(dq, dk, dv, None) from the forward's residuals (rows layout of plan p): FlashAttention-2's backward."""
    q_rows, k, v, pmask, out_rows, lse = residuals
    length, g, d = dout.shape[1], dout.shape[3], dout.shape[4]
    dq_rows, dk, dv = _backward(q_rows, _pad_keys(k, p), _pad_keys(v, p), pmask, out_rows, lse,
                                _rows(dout.astype(_F32), p), p, g)
    dq = _unrows(dq_rows, length, g) * (d ** -0.5)
    k_len = k.shape[2]
    return dq.astype(dout.dtype), dk[:, :, :k_len].astype(k.dtype), dv[:, :, :k_len].astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BxLxVxGxD, k_BxVxSxD, v_BxVxSxD, mask: AttentionMask, block_q: int | None = None,
                        block_k: int | None = None):
    """Attention by query and key blocks (module docstring), differentiable in q, k and v; blocks
    default to the module's BLOCK_Q and BLOCK_K (read at trace time).

    Matmuls run in the inputs' dtype with float32 accumulation (bfloat16 inputs: bfloat16 matmuls),
    the softmax in float32; returns [B, L, V, G, D] in q's dtype.
    """
    return _blockwise(q_BxLxVxGxD, k_BxVxSxD, v_BxVxSxD, mask, block_q or BLOCK_Q, block_k or BLOCK_K)


# ------------------------------------------------------------------------------------------------------------------
# The kernel path (Pallas: TPU and GPU; interpreted on a CPU)


def _kernel_forward(q, k, v, mask: AttentionMask, family: str, interpret: bool, with_lse: bool):
    """The Pallas forward in the kernels' rows layout: (out [B, V, Lq * G, D], lse [B, V, Lq * G] or None, the
    scaled q rows, the plan, the padded mask)."""
    b, length, nkv, g, d = q.shape
    p = flash_attention.plan(family, length, k.shape[2], g)  # has every field of _Plan the helpers read
    pmask = _padded_mask(mask, p)
    lq = p.nq * p.bq
    q_rows = jnp.pad(q * jnp.asarray(d ** -0.5, q.dtype), [(0, 0), (0, lq - length), (0, 0), (0, 0), (0, 0)])
    q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(b, nkv, lq * g, d)
    kt, vt = _pad_keys(k, p), _pad_keys(v, p)
    first, last = _key_block_range(pmask, p)
    causal = mask.q_pos is not None
    q_segment_rows = None if mask.q_segment is None else jnp.repeat(pmask.q_segment, g, axis=1)
    out, lse = flash_attention.flash_attention_rows(
        family, q_rows, kt, vt, pmask.k_valid, mask.q_pos[0] if causal else 0, first, last, p, causal=causal,
        q_segment_rows=q_segment_rows, k_segment=pmask.k_segment, with_lse=with_lse,
        out_dtype=_F32 if with_lse else q.dtype, interpret=interpret)
    return out, lse, q_rows, p, pmask


def _from_kernel_rows(x_BxVxRxD, p: flash_attention.Plan):
    """[B, V, nq * R, ...] (the kernels' rows) -> [nq, B, V, R, ...] (the blockwise path's)."""
    b, nkv = x_BxVxRxD.shape[:2]
    x = x_BxVxRxD.reshape(b, nkv, p.nq, -1, *x_BxVxRxD.shape[3:])
    return jnp.moveaxis(x, 2, 0)


def _kernel_out(out, q):
    b, length, nkv, g, d = q.shape
    return out.reshape(b, nkv, -1, g, d).transpose(0, 2, 1, 3, 4)[:, :length].astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, mask, family, interpret):
    return _kernel_out(_kernel_forward(q, k, v, mask, family, interpret, with_lse=False)[0], q)


def _flash_fwd(q, k, v, mask, family, interpret):
    out, lse, q_rows, p, pmask = _kernel_forward(q, k, v, mask, family, interpret, with_lse=True)
    out_rows = _from_kernel_rows(out, p)
    return _kernel_out(out, q), (_from_kernel_rows(q_rows, p), k, v, pmask, out_rows, _from_kernel_rows(lse, p))


def _flash_bwd(family, interpret, residuals, dout):
    p = flash_attention.plan(family, dout.shape[1], residuals[1].shape[2], dout.shape[3])
    return _gradients(residuals, dout, p)


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q_BxLxVxGxD, k_BxVxSxD, v_BxVxSxD, mask: AttentionMask, family: str | None = None):
    """Attention by the Pallas forward kernel of `family` ("tpu" or "gpu"; default: the platform traced
    for, the GPU body interpreted on a CPU), differentiable through the blockwise backward."""
    family = family or ("tpu" if current_platform() == "tpu" else "gpu")
    why = flash_attention.unsupported(family, q_BxLxVxGxD.shape[3], q_BxLxVxGxD.shape[4])
    if why:
        raise ValueError(f"attention impl='pallas' ({family} kernel): {why}; use impl='blockwise'")
    return _flash(q_BxLxVxGxD, k_BxVxSxD, v_BxVxSxD, mask, family, interpret_mode())


ATTENTION_IMPLS = ("auto", "blockwise", "pallas")


def resolve_attention_impl(impl: str, g: int, d: int) -> str:
    """'auto' -> 'blockwise' on CPU; 'pallas' on GPU and TPU where the kernel takes the heads' shape,
    else 'blockwise' with a warning logged once."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    platform = current_platform()
    if platform == "cpu":
        return "blockwise"
    why = flash_attention.unsupported(platform, g, d) if platform in flash_attention.FAMILIES else "no kernel"
    if why:
        log_once("attention", f"attention on {platform}: {why}; impl='auto' runs the blockwise XLA path")
        return "blockwise"
    return "pallas"


def attention(q_BxLxVxGxD, k_BxVxSxD, v_BxVxSxD, mask: AttentionMask, impl: str = "auto"):
    """Softmax attention of q over k, v under `mask`, by implementation `impl`:

    - "blockwise": `blockwise_attention` (XLA; every platform);
    - "pallas": `pallas_attention` (the platform's Pallas forward kernel, `kernels.flash_attention`);
    - "auto": the blockwise path on CPU, the Pallas kernel on GPU and TPU (`resolve_attention_impl`).
    """
    impl = resolve_attention_impl(impl, q_BxLxVxGxD.shape[3], q_BxLxVxGxD.shape[4])
    if impl == "pallas":
        return pallas_attention(q_BxLxVxGxD, k_BxVxSxD, v_BxVxSxD, mask)
    return blockwise_attention(q_BxLxVxGxD, k_BxVxSxD, v_BxVxSxD, mask)
