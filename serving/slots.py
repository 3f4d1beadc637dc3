"""The slot cache of the serving engine and the three compiled programs that touch it.

One `HybridCache` of `num_slots` rows, each row a sequence at its own length (the cache's index is one
position per row): the attention layers' KV of `max_model_len` per slot, the Mamba layers' conv window
and SSM state per slot, and beside it the float32 logits of each slot's last position, from which its
next token is sampled. Every program donates the cache, so it is updated in place:

  prefill_slot  a piece of one slot's prompt into its row (a batch-1 prefill on that row, written back)
  decode_slots  one token for every slot (each with its own sampling settings), run through the model
  reset_slot    a slot made empty before a new sequence: Mamba states zeroed, no real keys, position 0

Prompt pieces have power-of-two lengths (`piece_sizes`): a prompt is fed as the largest pieces that fit,
so every length is served by log2(chunk) + 1 programs compiled at start-up, and no piece is padded (a
padded position would decay a Mamba state that continues from the previous piece).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from common.sharding import constrain
from jamba_jax.cache import HybridCache, init_cache
from jamba_jax.layers import KVCache
from jamba_jax.mamba import MambaCache
from serving.sampling import sample_rows


def piece_sizes(max_chunk: int) -> list[int]:
    """The prompt piece lengths: powers of two up to max_chunk (itself a power of two)."""
    return [1 << i for i in range(max_chunk.bit_length())]


def next_piece(remaining: int, max_chunk: int, budget: int) -> int:
    """The longest power-of-two piece of at most `remaining`, `max_chunk` and `budget` (>= 1) tokens."""
    n = max(min(remaining, max_chunk, budget), 1)
    return 1 << (n.bit_length() - 1)


def init_slots(cfg, num_slots: int, max_model_len: int, dtype=None) -> tuple[HybridCache, jax.Array]:
    """(an empty slot cache with a position per row, zero logits [num_slots, vocab] float32)."""
    cache = init_cache(cfg, num_slots, max_model_len, dtype)
    return cache.replace(index=jnp.zeros((num_slots,), jnp.int32)), jnp.zeros((num_slots, cfg.vocab_size),
                                                                              jnp.float32)


def cache_logical_axes(cfg, cache: HybridCache) -> HybridCache:
    """Logical axis names of every array of the slot cache (slots replicated; under a mesh the KV heads and
    the Mamba channels split as the attention and Mamba weights that make them)."""
    lead = ("layers",) if cfg.scan_layers else ()

    def layer(c):
        if isinstance(c, KVCache):
            return KVCache(*[lead + (None, "kv_heads", None, None)] * 2)
        return MambaCache(lead + (None, None, "mamba_inner"), lead + (None, "mamba_inner", None))

    return HybridCache((None,), (None, None), tuple(layer(c) for c in cache.layers))


def _pinned(cfg, cache: HybridCache) -> HybridCache:
    """The cache constrained to its logical axes (a no-op without a mesh): every program returns it (and the
    logits, replicated) sharded as it came in, so donation holds and the next call compiles nothing new."""
    return jax.tree.map(constrain, cache, cache_logical_axes(cfg, cache))  # (each array's axes: a whole subtree)


def _row_axis(cfg) -> int:
    return 1 if cfg.scan_layers else 0  # scanned layers stack their caches over the repeats first


def _take_row(cfg, cache: HybridCache, slot) -> HybridCache:
    axis = _row_axis(cfg)
    layers = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis), cache.layers)
    return HybridCache(cache.index[slot], jax.lax.dynamic_slice_in_dim(cache.valid, slot, 1, 0), layers)


def _put_row(cfg, cache: HybridCache, row: HybridCache, slot) -> HybridCache:
    axis = _row_axis(cfg)
    layers = jax.tree.map(lambda x, r: jax.lax.dynamic_update_slice_in_dim(x, r, slot, axis), cache.layers,
                          row.layers)
    return HybridCache(cache.index.at[slot].set(row.index),
                       jax.lax.dynamic_update_slice_in_dim(cache.valid, row.valid, slot, 0), layers)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))
def prefill_slot(model, params, cache: HybridCache, logits_SxV, slot, ids_1xC):
    """A piece of a prompt [1, C] into slot `slot`'s row at its position: (logits with the slot's row set to
    the piece's last position's, cache)."""
    out = model.apply({"params": params}, ids_1xC, _take_row(model.cfg, cache, slot), method="prefill")
    logits = constrain(logits_SxV.at[slot].set(out.logits[0].astype(jnp.float32)), (None, None))
    return logits, _pinned(model.cfg, _put_row(model.cfg, cache, out.cache, slot))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))
def decode_slots(model, params, cache: HybridCache, logits_SxV, active_S, temperature_S, top_k_S, top_p_S, seed_S,
                 step_S):
    """Samples every slot's next token from its logits and runs the tokens through the model: (tokens [S],
    logits, cache). Inactive slots (empty, or still in prefill) keep their position, real keys and logits."""
    tokens = sample_rows(logits_SxV, temperature_S, top_k_S, top_p_S, seed_S, step_S)
    out = model.apply({"params": params}, tokens, cache, method="decode")
    keep = active_S[:, None]
    axis = _row_axis(model.cfg)

    def keep_rows(new, old):  # an inactive slot's Mamba state stays (a prompt in prefill continues from it)
        shape = [1] * new.ndim
        shape[axis] = new.shape[axis]
        return jnp.where(active_S.reshape(shape), new, old)

    # (an inactive slot's KV write lands at its position, unseen and overwritten by what comes next there)
    layers = tuple(jax.tree.map(keep_rows, n, o) if isinstance(o, MambaCache) else n
                   for n, o in zip(out.cache.layers, cache.layers, strict=True))
    new = HybridCache(jnp.where(active_S, out.cache.index, cache.index), jnp.where(keep, out.cache.valid, cache.valid),
                      layers)
    logits = constrain(jnp.where(keep, out.logits.astype(jnp.float32), logits_SxV), (None, None))
    return tokens, logits, _pinned(model.cfg, new)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def reset_slot(cfg, cache: HybridCache, slot) -> HybridCache:
    """Slot `slot` emptied for a new sequence: its Mamba conv and SSM states zeroed, none of its keys real,
    position 0 (its stale keys stay, unseen)."""
    axis = _row_axis(cfg)

    def zero_row(x):
        shape = list(x.shape)
        shape[axis] = 1
        return jax.lax.dynamic_update_slice_in_dim(x, jnp.zeros(shape, x.dtype), slot, axis)

    layers = tuple(MambaCache(*map(zero_row, c)) if isinstance(c, MambaCache) else c for c in cache.layers)
    return _pinned(cfg, HybridCache(cache.index.at[slot].set(0), cache.valid.at[slot].set(False), layers))
