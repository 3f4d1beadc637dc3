"""Attention of the few new tokens of a decode step over the cache they are written into.

`cached_attention` is what a model's attention layer calls with a cache. Few new query rows (new tokens x
G <= FEW_ROWS: decoding) on the blockwise path attend over the cache as it was before the step's write, in
one pass, and over their own keys apart, the two merged by log-sum-exp; the write is made to depend on the
result, so XLA updates the donated cache in place after reading it. Read the updated cache instead and XLA:CPU
fuses the write into the reader, copying the whole cache twice a step (48 vs 15 ms a token from a 128K cache,
BENCHMARKS.md `long_context`). Anything else (prefill chunks, the Pallas kernels) is `attention` over the
updated cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.attention import _LOWEST, AttentionMask, _dot, _plan, _rows, _unrows, attention, resolve_attention_impl

FEW_ROWS = 16  # query rows (new tokens x G) up to which `cached_attention` reads the cache in one pass


def _one_pass(q_rows_BxVxRxD, k_BxVxSxD, v_BxVxSxD, mask: AttentionMask, g: int):
    """(out [B, V, R, D] float32, lse [B, V, R]) of a few rows (query-major: row = query x G + group, already
    scaled) over every key at once. The two matmuls take the scores keys-major, [B, V, S, R] (XLA:CPU runs
    both near memory speed that way and 1.5-2x slower rows-major), the softmax takes them rows-major (its
    reductions over S 3x faster): 8.4 ms against 12.6 for all keys-major over a 128K cache
    of 2 kv heads x 4 rows. Costs S x R floats per kv head, which is why only few rows take it."""
    b, s_len = mask.k_valid.shape
    length = q_rows_BxVxRxD.shape[2] // g
    s = _dot(q_rows_BxVxRxD, k_BxVxSxD, "bvrd,bvsd->bvsr").transpose(0, 1, 3, 2)  # [B, V, R, S]
    visible = mask.block(0, length, 0, s_len)  # [B, L, S]
    visible = jnp.broadcast_to(visible[:, None, :, None], (b, 1, length, g, s_len)).reshape(b, 1, -1, s_len)
    s = jnp.where(visible, s, _LOWEST)
    m = s.max(axis=-1)
    pr = jnp.exp(s - m[..., None])
    denom = pr.sum(axis=-1)
    out = _dot(pr.astype(v_BxVxSxD.dtype).transpose(0, 1, 3, 2), v_BxVxSxD, "bvsr,bvsd->bvrd") / denom[..., None]
    return out, m + jnp.log(denom)


def cached_attention(q_BxLxVxGxD, k_new_BxVxLxD, v_new_BxVxLxD, k_cache_BxVxSxD, v_cache_BxVxSxD, index,
                     mask: AttentionMask, impl: str = "auto"):
    """Attention of L new tokens over a cache they are written into at slot `index` (module docstring):
    (out [B, L, V, G, D], updated k cache, updated v cache). `mask` is `AttentionMask.cached` over the
    updated cache."""
    b, length, nkv, g, d = q_BxLxVxGxD.shape
    dtype = q_BxLxVxGxD.dtype

    def write(at):
        start = (0, 0, at, 0)
        return (jax.lax.dynamic_update_slice(k_cache_BxVxSxD, k_new_BxVxLxD.astype(k_cache_BxVxSxD.dtype), start),
                jax.lax.dynamic_update_slice(v_cache_BxVxSxD, v_new_BxVxLxD.astype(v_cache_BxVxSxD.dtype), start))

    if length * g > FEW_ROWS or resolve_attention_impl(impl, g, d) != "blockwise":
        k_cache, v_cache = write(index)
        return attention(q_BxLxVxGxD, k_cache.astype(dtype), v_cache.astype(dtype), mask, impl), k_cache, v_cache
    if mask.q_segment is not None:
        raise ValueError("cached_attention: packed segments do not apply to a cache")
    s_len = k_cache_BxVxSxD.shape[2]
    p = _plan(length, s_len, length, s_len)  # one block of queries, one of keys
    q_rows = _rows(q_BxLxVxGxD * jnp.asarray(d ** -0.5, dtype), p)[0]
    before = jnp.arange(s_len, dtype=jnp.int32) < index
    o1, lse1 = _one_pass(q_rows, k_cache_BxVxSxD.astype(dtype), v_cache_BxVxSxD.astype(dtype),
                         mask._replace(k_valid=mask.k_valid & before[None]), g)
    own_valid = jax.lax.dynamic_slice_in_dim(mask.k_valid, index, length, axis=1)
    o2, lse2 = _one_pass(q_rows, k_new_BxVxLxD.astype(dtype), v_new_BxVxLxD.astype(dtype),
                         AttentionMask(own_valid, mask.q_pos - index), g)
    top = jnp.maximum(lse1, lse2)
    w1, w2 = jnp.exp(lse1 - top), jnp.exp(lse2 - top)
    out = (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]
    out = _unrows(out[None], length, g).astype(dtype)
    # The write after the reads: `index` again, but through a value of `out`, so XLA sees the in-place
    # update depend on the dots that read the old cache; without it, it schedules the update first and
    # copies the whole cache, twice, at every step.
    after = jnp.minimum(index, jnp.where(jnp.isnan(out.reshape(-1)[0]), jnp.iinfo(jnp.int32).max, index))
    k_cache, v_cache = write(after)
    return out, k_cache, v_cache
