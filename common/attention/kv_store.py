"""How a KV cache holds keys or values ([B, H, S, D]): a plain array of its dtype (float32, bfloat16), or `Int8KV`,
int8 values with a float32 scale per position and head (the absmax over D / 127, symmetric, computed as each token
is written: nothing to calibrate). int8 reads D + 4 bytes per position and head against 4 D for float32 (3.6x fewer
at D = 32, 3.9x at 128); its error is at most half a step, |x|max / 254, per element.

Attention over a store: `read` gives the dequantized array (prefill chunks); the few-row decode path
(`common.attention.cached.one_pass`) takes `parts`, the values and the int8 scale, and folds the scales into the
scores and the probabilities instead: a bf16 store is multiplied as bf16 (the rows cast to it, float32
accumulation), an int8 one converted a chunk of keys at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.platform import current_platform

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


def _updated(store, new, update):
    """`update(array, new)` on each array of the store; on the CPU a bfloat16 array through its uint16 view:
    XLA:CPU widens a bf16 dynamic-update-slice to float32, converting the whole cache there and back (2 ms per
    store a step from a 128K cache of the benchmark model; the view's bitcasts cost a quarter of that)."""
    def one(a, n):
        if a.dtype != jnp.bfloat16 or current_platform() != "cpu":
            return update(a, n)
        bits = update(jax.lax.bitcast_convert_type(a, jnp.uint16), jax.lax.bitcast_convert_type(n, jnp.uint16))
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)

    return jax.tree.map(one, store, _as_stored(store, new))


def as_stored(store, new, dtype):
    """`new` keys or values as `store` would hold them, read back in `dtype` (rounded to int8 or bf16, or as is)."""
    return read(_as_stored(store, new), dtype)


def write(store, new_BxHxLxD, at):
    """The store with L new positions written from slot `at` (a scalar) on."""
    return _updated(store, new_BxHxLxD, lambda s, n: jax.lax.dynamic_update_slice_in_dim(s, n, at, axis=2))


def write_rows(store, new_BxHxD, index_B):
    """The store with one new position per row b written at slot index_B[b] (past the cache: dropped)."""
    rows_B = jnp.arange(new_BxHxD.shape[0])
    return _updated(store, new_BxHxD, lambda s, n: s.at[rows_B, :, index_B].set(n, mode="drop"))


def parts(store, dtype):
    """(values, float32 scale [B, H, S] or None): what `store` holds, the scale not yet applied; int8 values
    converted to `dtype`, float values as they are (a matmul takes them in their own dtype)."""
    if isinstance(store, Int8KV):
        return store.q.astype(dtype), store.scale
    return store, None


def read(store, dtype):
    """The stored keys or values in `dtype`, dequantized."""
    values, scale = parts(store, jnp.float32)
    return values.astype(dtype) if scale is None else (values * scale[..., None]).astype(dtype)
