"""Attention of the new tokens of a step over the cache they are written into (`cached_attention`, what
a model's attention layer calls with a cache).

Few new query rows (new tokens x G <= FEW_ROWS: decoding) on the blockwise path attend over the cache
as it was before the step's write, in one pass, and over their own keys apart, the two merged by
log-sum-exp; the write comes after the reads, so XLA updates the donated cache in place instead of
copying it. Anything else (prefill chunks, the Pallas kernels) is `attention` over the updated cache.

With an index per row ([B]: a serving engine's slots, each sequence at its own length) one new token per row
is written at its row's index and attends over its row's real keys (`per_row_cached_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.attention.blocks import LOWEST, dot, plan, rows, unrows
from common.attention.dispatch import attention, resolve_attention_impl
from common.attention.mask import AttentionMask

FEW_ROWS = 16  # query rows (new tokens x G) up to which `cached_attention` reads the cache in one pass


def one_pass(q_rows_BxHxRxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask, g: int):
    """(out [B, H, R, D] float32, lse [B, H, R]) of a few rows (query-major: row = query x G + group, already
    scaled) over every key at once. Both matmuls take the scores keys-major, [B, H, S, R], the layout in
    which a few rows stream the keys once; the softmax takes them rows-major, reducing over contiguous S.
    Holds S x R floats per kv head, which is why only few rows take this path."""
    b, s_len = mask.k_valid.shape
    length = q_rows_BxHxRxD.shape[2] // g
    s = dot(q_rows_BxHxRxD, k_BxHxSxD, "bhrd,bhsd->bhsr").transpose(0, 1, 3, 2)  # [B, H, R, S]
    visible = mask.block(0, length, 0, s_len)  # [B, L, S]
    visible = jnp.broadcast_to(visible[:, None, :, None], (b, 1, length, g, s_len)).reshape(b, 1, -1, s_len)
    s = jnp.where(visible, s, LOWEST)
    m = s.max(axis=-1)
    pr = jnp.exp(s - m[..., None])
    denom = pr.sum(axis=-1)
    out = dot(pr.astype(v_BxHxSxD.dtype).transpose(0, 1, 3, 2), v_BxHxSxD, "bhsr,bhsd->bhrd") / denom[..., None]
    return out, m + jnp.log(denom)


def _write(k_cache, v_cache, k_new, v_new, at):
    start = (0, 0, at, 0)
    return (jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), start),
            jax.lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), start))


def per_row_cached_attention(q_BxLxHxGxD, k_new_BxHxLxD, v_new_BxHxLxD, k_cache_BxHxSxD, v_cache_BxHxSxD, index_B,
                             mask: AttentionMask):
    """One new token per row written at its row's own slot index_B[b] (an index past the cache drops the
    write), then its query over the row's real keys in one pass. `mask.k_valid` marks them (the new slot
    included); every real key precedes the new token, so no causal term is needed."""
    b, length, nkv, g, d = q_BxLxHxGxD.shape
    if length != 1:
        raise ValueError(f"per-row cache positions take one new token per row, got {length}")
    dtype = q_BxLxHxGxD.dtype
    rows_B = jnp.arange(b)
    k_cache = k_cache_BxHxSxD.at[rows_B, :, index_B].set(k_new_BxHxLxD[:, :, 0].astype(k_cache_BxHxSxD.dtype),
                                                         mode="drop")
    v_cache = v_cache_BxHxSxD.at[rows_B, :, index_B].set(v_new_BxHxLxD[:, :, 0].astype(v_cache_BxHxSxD.dtype),
                                                         mode="drop")
    s_len = k_cache.shape[2]
    q_rows = rows(q_BxLxHxGxD * jnp.asarray(d ** -0.5, dtype), plan(1, s_len, 1, s_len, g))[0]
    out, _ = one_pass(q_rows, k_cache.astype(dtype), v_cache.astype(dtype), AttentionMask(mask.k_valid), g)
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
    if length * g > FEW_ROWS or resolve_attention_impl(impl, g, d) != "blockwise":
        k_cache, v_cache = _write(k_cache_BxHxSxD, v_cache_BxHxSxD, k_new_BxHxLxD, v_new_BxHxLxD, index)
        return attention(q_BxLxHxGxD, k_cache.astype(dtype), v_cache.astype(dtype), mask, impl), k_cache, v_cache
    if mask.q_segment is not None:
        raise ValueError("cached_attention: packed segments do not apply to a cache")
    s_len = k_cache_BxHxSxD.shape[2]
    q_rows = rows(q_BxLxHxGxD * jnp.asarray(d ** -0.5, dtype), plan(length, s_len, length, s_len, g))[0]
    before = jnp.arange(s_len, dtype=jnp.int32) < index
    o1, lse1 = one_pass(q_rows, k_cache_BxHxSxD.astype(dtype), v_cache_BxHxSxD.astype(dtype),
                        mask._replace(k_valid=mask.k_valid & before[None]), g)
    own_valid = jax.lax.dynamic_slice_in_dim(mask.k_valid, index, length, axis=1)
    o2, lse2 = one_pass(q_rows, k_new_BxHxLxD.astype(dtype), v_new_BxHxLxD.astype(dtype),
                        AttentionMask(own_valid, mask.q_pos - index), g)
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
