"""Attention of the new tokens of a step over the cache they are written into (`cached_attention`, what
a model's attention layer calls with a cache).

Few new query rows (new tokens x G <= FEW_ROWS: decoding) on the blockwise path, or over a cache stored in
another dtype than the compute dtype (int8, bf16), attend over the cache as it was before the step's write, in
one pass (`one_pass`), and over their own keys apart, the two merged by
log-sum-exp; the write comes after the reads, so XLA updates the donated cache in place instead of
copying it. Anything else (prefill chunks, the Pallas kernels) is `attention` over the updated cache.

With an index per row ([B]: a serving engine's slots, each sequence at its own length) one new token per row
is written at its row's index and attends over its row's real keys (`per_row_cached_attention`).

The caches are `common.attention.kv_store` stores: arrays of their dtype, or int8 with a scale per position and head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.attention import kv_store
from common.attention.blocks import LOWEST, dot, plan, rows, unrows
from common.attention.dispatch import attention, resolve_attention_impl
from common.attention.mask import AttentionMask

FEW_ROWS = 16  # query rows (new tokens x G) up to which `cached_attention` reads the cache in one pass
KV_CHUNK = 4096  # keys per step of `one_pass` over an int8 cache


def _scores_pass(q_rows_BxHxRxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask, g: int, k_start, k_len: int,
                 k_from=None):
    """(unnormalised out [B, H, R, D] float32, row max m [B, H, R], denominator [B, H, R]) of the rows over keys
    [k_start, k_start + k_len) of the stores (those before `k_from`, when given, unseen). The scores come out
    rows-major, [B, H, R, S] (q k^T with k as it lies), the softmax reduces over contiguous S and p v is a plain
    [R, S] @ [S, D]: no transposes of the scores (0.7x the time of computing them keys-major and transposing
    twice, from a 128K cache on the CPU)."""
    dtype = q_rows_BxHxRxD.dtype
    (k, k_scale), (v, v_scale) = kv_store.parts(k_BxHxSxD, dtype), kv_store.parts(v_BxHxSxD, dtype)
    b = mask.k_valid.shape[0]
    length = q_rows_BxHxRxD.shape[2] // g
    s = dot(q_rows_BxHxRxD.astype(k.dtype), k, "bhrd,bhsd->bhrs")  # (a bf16 store: bf16 products, f32 sums)
    s = s if k_scale is None else s * k_scale[:, :, None, :]
    visible = mask.block(0, length, k_start, k_len)  # [B, L, S]
    if k_from is not None:
        visible = visible & (k_start + jnp.arange(k_len, dtype=jnp.int32) >= k_from)
    visible = jnp.broadcast_to(visible[:, None, :, None], (b, 1, length, g, k_len)).reshape(b, 1, -1, k_len)
    s = jnp.where(visible, s, LOWEST)
    m = s.max(axis=-1)
    pr = jnp.exp(s - m[..., None])
    pv = pr if v_scale is None else pr * v_scale[:, :, None, :]
    return dot(pv.astype(v.dtype), v, "bhrs,bhsd->bhrd"), m, pr.sum(axis=-1)


def _chunked_pass(q_rows_BxHxRxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask, g: int):
    """`_scores_pass` over chunks of KV_CHUNK keys merged by their running max (flash-decoding, one loop): an int8
    store is converted a chunk at a time, never as a whole float copy of the cache. (A loop, not unrolled chunks:
    XLA schedules unrolled chunks' converts all at once, which is the float copy again.)"""
    s_len = mask.k_valid.shape[1]
    chunk = min(KV_CHUNK, s_len)

    def step(j, carry):
        acc, m, den = carry
        start = jnp.minimum(j * chunk, s_len - chunk)  # the last chunk ends at s_len; keys before j x chunk: done
        k_j, v_j = (jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk, 2), st)
                    for st in (k_BxHxSxD, v_BxHxSxD))
        acc_j, m_j, den_j = _scores_pass(q_rows_BxHxRxD, k_j, v_j, mask, g, start, chunk, k_from=j * chunk)
        top = jnp.maximum(m, m_j)
        a, a_j = jnp.exp(m - top), jnp.exp(m_j - top)
        return acc * a[..., None] + acc_j * a_j[..., None], top, den * a + den_j * a_j

    b, h, r, d = q_rows_BxHxRxD.shape
    init = (jnp.zeros((b, h, r, d), jnp.float32), jnp.full((b, h, r), LOWEST, jnp.float32),
            jnp.zeros((b, h, r), jnp.float32))
    return jax.lax.fori_loop(0, -(-s_len // chunk), step, init)


def one_pass(q_rows_BxHxRxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask, g: int):
    """(out [B, H, R, D] float32, lse [B, H, R]) of a few rows (query-major: row = query x G + group, already
    scaled) over every key. Keys and values are kv_store stores (int8: each position's scale
    multiplies its scores, and its probabilities before the values' product): float stores read in one pass (S x R
    floats of scores per kv head, which is why only few rows take this path), int8 ones in chunks
    (`_chunked_pass`)."""
    if not any(isinstance(x, kv_store.Int8KV) for x in (k_BxHxSxD, v_BxHxSxD)):
        acc, m, den = _scores_pass(q_rows_BxHxRxD, k_BxHxSxD, v_BxHxSxD, mask, g, 0, mask.k_valid.shape[1])
    else:
        acc, m, den = _chunked_pass(q_rows_BxHxRxD, k_BxHxSxD, v_BxHxSxD, mask, g)
    return acc / den[..., None], m + jnp.log(den)


def _write(k_cache, v_cache, k_new, v_new, at):
    return kv_store.write(k_cache, k_new, at), kv_store.write(v_cache, v_new, at)


def per_row_cached_attention(q_BxLxHxGxD, k_new_BxHxLxD, v_new_BxHxLxD, k_cache_BxHxSxD, v_cache_BxHxSxD, index_B,
                             mask: AttentionMask):
    """One new token per row written at its row's own slot index_B[b] (an index past the cache drops the
    write), then its query over the row's real keys in one pass. `mask.k_valid` marks them (the new slot
    included); every real key precedes the new token, so no causal term is needed."""
    b, length, nkv, g, d = q_BxLxHxGxD.shape
    if length != 1:
        raise ValueError(f"per-row cache positions take one new token per row, got {length}")
    dtype = q_BxLxHxGxD.dtype
    k_cache = kv_store.write_rows(k_cache_BxHxSxD, k_new_BxHxLxD[:, :, 0], index_B)
    v_cache = kv_store.write_rows(v_cache_BxHxSxD, v_new_BxHxLxD[:, :, 0], index_B)
    s_len = mask.k_valid.shape[1]
    q_rows = rows(q_BxLxHxGxD * jnp.asarray(d ** -0.5, dtype), plan(1, s_len, 1, s_len, g))[0]
    out, _ = one_pass(q_rows, k_cache, v_cache, AttentionMask(mask.k_valid), g)
    return unrows(out[None], 1, g).astype(dtype), k_cache, v_cache


def cached_attention(q_BxLxHxGxD, k_new_BxHxLxD, v_new_BxHxLxD, k_cache_BxHxSxD, v_cache_BxHxSxD, index,
                     mask: AttentionMask, impl: str = "auto"):
    """Attention of L new tokens over a cache they are written into at slot `index` (module docstring):
    (out [B, L, H, G, D], updated k cache, updated v cache). `mask` is `AttentionMask.cached` over the
    updated cache. An `index` of shape [B] is a position per row (`per_row_cached_attention`)."""
    if jnp.ndim(index) == 1:
        return per_row_cached_attention(q_BxLxHxGxD, k_new_BxHxLxD, v_new_BxHxLxD, k_cache_BxHxSxD, v_cache_BxHxSxD,
                                        index, mask)
    b, length, nkv, g, d = q_BxLxHxGxD.shape
    dtype = q_BxLxHxGxD.dtype
    native = all(kv_store.dtype_of(x) == dtype for x in (k_cache_BxHxSxD, v_cache_BxHxSxD))
    # (a cache in another dtype takes the chunked one pass on every platform: the kernels read compute-dtype arrays,
    # and handing them the cache dequantized would convert all of it each step)
    if length * g > FEW_ROWS or (native and resolve_attention_impl(impl, g, d) != "blockwise"):
        k_cache, v_cache = _write(k_cache_BxHxSxD, v_cache_BxHxSxD, k_new_BxHxLxD, v_new_BxHxLxD, index)
        out = attention(q_BxLxHxGxD, kv_store.read(k_cache, dtype), kv_store.read(v_cache, dtype), mask, impl)
        return out, k_cache, v_cache
    if mask.q_segment is not None:
        raise ValueError("cached_attention: packed segments do not apply to a cache")
    s_len = mask.k_valid.shape[1]
    q_rows = rows(q_BxLxHxGxD * jnp.asarray(d ** -0.5, dtype), plan(length, s_len, length, s_len, g))[0]
    before = jnp.arange(s_len, dtype=jnp.int32) < index
    o1, lse1 = one_pass(q_rows, k_cache_BxHxSxD, v_cache_BxHxSxD, mask._replace(k_valid=mask.k_valid & before[None]),
                        g)
    own_valid = jax.lax.dynamic_slice_in_dim(mask.k_valid, index, length, axis=1)
    # the new keys and values as the cache will hold them (int8, bf16: rounded), so this step sees them as every
    # later step and a serving slot (which writes before it reads) will
    own = [kv_store.as_stored(c, x, dtype) for c, x in ((k_cache_BxHxSxD, k_new_BxHxLxD),
                                                        (v_cache_BxHxSxD, v_new_BxHxLxD))]
    o2, lse2 = one_pass(q_rows, *own, AttentionMask(own_valid, mask.q_pos - index), g)
    top = jnp.maximum(lse1, lse2)
    w1, w2 = jnp.exp(lse1 - top), jnp.exp(lse2 - top)
    out = (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]
    out = unrows(out[None], length, g).astype(dtype)
    # The write after the reads: its start index is `index` again, but computed from a value of `out`, so the
    # in-place update depends on the dots that read the old cache and XLA cannot schedule it before them (and
    # copy the cache). Needed: an optimization_barrier over (out, caches), (out, index) or (out, new keys)
    # leaves the copy in (tests/test_generation.py::test_a_decode_step_updates_the_cache_in_place).
    after = jnp.minimum(index, jnp.where(jnp.isnan(out.reshape(-1)[0]), jnp.iinfo(jnp.int32).max, index))
    k_cache, v_cache = _write(k_cache_BxHxSxD, v_cache_BxHxSxD, k_new_BxHxLxD, v_new_BxHxLxD, after)
    return out, k_cache, v_cache
