"""How a KV cache holds keys or values ([B, H, S, D]): a plain array of its dtype (float32, bfloat16), or `Int8KV`,
int8 values with a float32 scale per position and head (the absmax over D / 127, symmetric, computed as each token
is written: nothing to calibrate). int8 reads D + 4 bytes per position and head against 4 D for float32 (3.6x fewer
at D = 32, 3.9x at 128); its error is at most half a step, |x|max / 254, per element.

Attention over a store: `read` gives the dequantized array (prefill chunks); the few-row decode path
(`common.attention.cached.one_pass`) takes `parts`, the int8 values and their scale, and folds the scales into the
scores and the probabilities instead, so the cache is read once, as int8.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")


class Int8KV(NamedTuple):
    q: jax.Array  # int8 [B, H, S, D]
    scale: jax.Array  # float32 [B, H, S]: q * scale is the stored value


def empty(shape, dtype):
    """A store of `shape` [B, H, S, D] in `dtype` (one of KV_CACHE_DTYPES, or any float dtype), all zeros."""
    if jnp.dtype(dtype) == jnp.int8:
        return Int8KV(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], jnp.float32))
    return jnp.zeros(shape, dtype)


def dtype_of(store):
    return jnp.dtype(jnp.int8) if isinstance(store, Int8KV) else store.dtype


def quantize(x) -> Int8KV:
    """int8 values and a float32 scale per vector of the last axis (absmax / 127; 0 for a zero vector)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    q = jnp.round(x / jnp.where(scale > 0, scale, 1.0)[..., None])
    return Int8KV(jnp.clip(q, -127, 127).astype(jnp.int8), scale)


def _as_stored(store, new):
    return quantize(new) if isinstance(store, Int8KV) else new.astype(store.dtype)


def as_stored(store, new, dtype):
    """`new` keys or values as `store` would hold them, read back in `dtype` (rounded to int8 or bf16, or as is)."""
    return read(_as_stored(store, new), dtype)


def write(store, new_BxHxLxD, at):
    """The store with L new positions written from slot `at` (a scalar) on."""
    return jax.tree.map(lambda s, n: jax.lax.dynamic_update_slice_in_dim(s, n, at, axis=2), store,
                        _as_stored(store, new_BxHxLxD))


def write_rows(store, new_BxHxD, index_B):
    """The store with one new position per row b written at slot index_B[b] (past the cache: dropped)."""
    rows_B = jnp.arange(new_BxHxD.shape[0])
    return jax.tree.map(lambda s, n: s.at[rows_B, :, index_B].set(n, mode="drop"), store, _as_stored(store, new_BxHxD))


def parts(store, dtype):
    """(values in `dtype`, float32 scale [B, H, S] or None): what `store` holds, the scale not yet applied."""
    if isinstance(store, Int8KV):
        return store.q.astype(dtype), store.scale
    return store.astype(dtype), None


def read(store, dtype):
    """The stored keys or values in `dtype`, dequantized."""
    values, scale = parts(store, jnp.float32 if isinstance(store, Int8KV) else dtype)
    return values.astype(dtype) if scale is None else (values * scale[..., None]).astype(dtype)
