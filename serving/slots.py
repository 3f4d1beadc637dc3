"""The slot cache of the serving engine and the compiled programs that fill and advance it.

One `HybridCache` of `num_slots` rows, each row a sequence at its own length (the cache's index is one
position per row): the attention layers' KV of `max_model_len` per slot, the Mamba layers' conv window
and SSM state per slot, and beside it the float32 logits of each slot's last position, from which its
next token is sampled. Every program that takes the cache donates it, so it is updated in place:

  prefill_rows  whole prompts of several requests new to their slots, left-padded to one length, batched,
                into a cache of their own (no slot touched: it may run beside a decode call), and
  insert_rows   those rows put into their slots, each replacing its slot's sequence whole
  prefill_slot  a piece of one slot's prompt into its row (a batch-1 prefill on that row, written back)
  decode_slots  a few tokens for every slot (each with its own sampling settings), run through the model,
                in one device loop
  reset_slot    a slot made empty before a prompt fed in pieces: Mamba states zeroed, no real keys, position 0

A new request whose whole prompt fits one chunk (and whose padded prompt leaves room for its max_tokens) is
prefilled in a group: the prompts that arrived together, left-padded to 2^k or 3 x 2^(k-2) (`bucket`) and
batched (`group_sizes` rows), as generate() prefills a left-padded batch. Any other prompt (a long one, a
continuation) is fed as exact pieces of power-of-two lengths (`piece_sizes`), the largest that fit: none is
padded, since a padded position would decay a Mamba state that continues from the previous piece. So every
load is served by a fixed set of programs, all compiled at start-up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from common.attention import kv_store
from common.sharding import constrain
from jamba_jax.cache import HybridCache, init_cache
from jamba_jax.layers import KVCache
from jamba_jax.mamba import MambaCache
from serving.sampling import sample_rows

MIN_BUCKET = 8  # the shortest padded prompt of a group prefill


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
        if isinstance(c, KVCache):  # an int8 store's scale [B, H, S] splits as its values
            return jax.tree.map(lambda x: lead + (None, "kv_heads", None, None)[:x.ndim - len(lead)], c)
        return MambaCache(lead + (None, None, "mamba_inner"), lead + (None, "mamba_inner", None))

    return HybridCache((None,), (None, None), tuple(layer(c) for c in cache.layers))


def _pinned(cfg, cache: HybridCache) -> HybridCache:
    """The cache constrained to its logical axes (a no-op without a mesh): every program returns it (and the
    logits, replicated) sharded as it came in, so donation holds and the next call compiles nothing new."""
    return jax.tree.map(constrain, cache, cache_logical_axes(cfg, cache))  # (each array's axes: a whole subtree)


def kv_dtype(cache: HybridCache):
    """The KV stores' dtype (None without attention layers)."""
    return next((kv_store.dtype_of(c.k) for c in cache.layers if isinstance(c, KVCache)), None)


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


def group_sizes(num_slots: int) -> list[int]:
    """The row counts a group prefill is compiled for: powers of two below num_slots, and num_slots."""
    return sorted({min(1 << i, num_slots) for i in range(num_slots.bit_length() + 1)})


def group_rows(n: int, num_slots: int) -> int:
    """The rows of a group prefill of n prompts: the first of `group_sizes` that holds them."""
    return next(g for g in group_sizes(num_slots) if g >= n)


def pack_group(prompts: list[list[int]], num_slots: int):
    """(ids, mask [rows, B] int32): the prompts left-padded to the bucket of the longest, in `group_rows`
    rows (padding rows all padding)."""
    rows, b = group_rows(len(prompts), num_slots), max(bucket(len(p)) for p in prompts)
    ids, mask = np.zeros((rows, b), np.int32), np.zeros((rows, b), np.int32)
    for i, p in enumerate(prompts):
        ids[i, b - len(p):], mask[i, b - len(p):] = p, 1
    return ids, mask


def bucket(length: int, min_bucket: int = MIN_BUCKET) -> int:
    """The padded length of a whole prompt in a group prefill: the next of 2^k and 3 x 2^(k-2) (8, 12, 16, 24,
    32, 48, ...), at least min_bucket. Padding is computed like any token: against powers of two alone this
    cuts it from 1.46x to 1.17x a prompt's length, for prompts uniform in [8, 96], at ~1.7x the programs."""
    b = max(min_bucket, 1 << (length - 1).bit_length())
    return b * 3 // 4 if length <= b * 3 // 4 and b * 3 // 4 >= min_bucket else b


def bucket_sizes(max_chunk: int) -> list[int]:
    """Every padded length `bucket` gives a prompt of at most max_chunk tokens."""
    return sorted({bucket(n) for n in range(1, max_chunk + 1)})


@functools.partial(jax.jit, static_argnums=(0, 4))
def prefill_rows(model, params, ids_GxB, mask_GxB, cache_dtype=None):
    """Whole prompts of G requests, left-padded to one length B, in one batched prefill from a fresh state (the
    padding leaves the real tokens' results as they are: Jamba has no positional embedding, masked keys are
    unseen and a zero Mamba state stays zero through zeroed inputs): (float32 logits [G, V] of each row's last
    position, their cache of G rows x B positions, KV in `cache_dtype`). It touches no slot, so it may run while a
    decode call updates the slots (`insert_rows` then puts the rows in)."""
    g, b = ids_GxB.shape
    out = model.apply({"params": params}, ids_GxB, init_cache(model.cfg, g, b, cache_dtype), attention_mask=mask_GxB,
                      method="prefill")
    return out.logits.astype(jnp.float32), out.cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1, 2))
def insert_rows(cfg, cache: HybridCache, logits_SxV, slots_G, mask_GxB, new_logits_GxV, new: HybridCache):
    """`prefill_rows`' results put in the slots, each replacing its slot's sequence whole: its keys land at
    [0, B) (none after them real), its Mamba states replace the slot's, its position is B; rows whose slot index
    is past the cache (a group's padding, rows placed at another time) are dropped."""
    b, length = mask_GxB.shape[1], cache.valid.shape[1]
    lead = (slice(None),) * _row_axis(cfg)

    def put(c, n):  # KV (values, and an int8 store's scales): positions [0, B) of each slot; Mamba: whole rows
        at = lead + ((slots_G, slice(None), slice(0, b)) if isinstance(c, KVCache) else (slots_G,))
        return jax.tree.map(lambda x, v: x.at[at].set(v.astype(x.dtype), mode="drop"), c, n)

    layers = tuple(put(c, n) for c, n in zip(cache.layers, new.layers, strict=True))
    out = HybridCache(cache.index.at[slots_G].set(b, mode="drop"),
                      cache.valid.at[slots_G].set(jnp.pad(mask_GxB.astype(bool), ((0, 0), (0, length - b))),
                                                  mode="drop"), layers)
    logits = constrain(logits_SxV.at[slots_G].set(new_logits_GxV, mode="drop"), (None, None))
    return logits, _pinned(cfg, out)


def prefill_group(model, params, cache: HybridCache, logits_SxV, slots_G, ids_GxB, mask_GxB):
    """`prefill_rows` then `insert_rows`: (logits, cache) with the group's prompts in their slots."""
    new_logits, new = prefill_rows(model, params, ids_GxB, mask_GxB, kv_dtype(cache))
    return insert_rows(model.cfg, cache, logits_SxV, slots_G, mask_GxB, new_logits, new)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))
def prefill_slot(model, params, cache: HybridCache, logits_SxV, slot, ids_1xC):
    """A piece of a prompt [1, C] into slot `slot`'s row at its position: (logits with the slot's row set to
    the piece's last position's, cache)."""
    out = model.apply({"params": params}, ids_1xC, _take_row(model.cfg, cache, slot), method="prefill")
    logits = constrain(logits_SxV.at[slot].set(out.logits[0].astype(jnp.float32)), (None, None))
    return logits, _pinned(model.cfg, _put_row(model.cfg, cache, out.cache, slot))


def _decode_once(model, params, cache: HybridCache, logits_SxV, active_S, sampling, step_S, keep_states: bool):
    """One token for every active slot: (tokens [S], logits, cache); inactive slots keep their position, real
    keys and logits, and with `keep_states` their Mamba states (a select over the states costs ~10% of a step
    of the benchmark model, so it runs only while a prompt in pieces needs it)."""
    tokens = sample_rows(logits_SxV, *sampling, step_S)
    out = model.apply({"params": params}, tokens, cache, method="decode")
    keep = active_S[:, None]
    axis = _row_axis(model.cfg)

    def keep_rows(new, old):  # an inactive slot's Mamba state stays (a prompt in prefill continues from it)
        shape = [1] * new.ndim
        shape[axis] = new.shape[axis]
        return jnp.where(active_S.reshape(shape), new, old)

    # (an inactive slot's KV write lands at its position, unseen and overwritten by what comes next there)
    layers = tuple(jax.tree.map(keep_rows, n, o) if keep_states and isinstance(o, MambaCache) else n
                   for n, o in zip(out.cache.layers, cache.layers, strict=True))
    new = HybridCache(jnp.where(active_S, out.cache.index, cache.index), jnp.where(keep, out.cache.valid, cache.valid),
                      layers)
    logits = constrain(jnp.where(keep, out.logits.astype(jnp.float32), logits_SxV), (None, None))
    return tokens, logits, _pinned(model.cfg, new)


@functools.partial(jax.jit, static_argnums=(0, 11, 12), donate_argnums=(2, 3))
def decode_slots(model, params, cache: HybridCache, logits_SxV, active_S, temperature_S, top_k_S, top_p_S, seed_S,
                 step_S, budget_S, steps: int = 1, keep_states: bool = True):
    """`steps` decode steps in one program (a loop on the device: no return to the host between them). In each,
    every slot still active (active_S, and fewer than budget_S tokens in this call) samples its next token with
    its own settings and runs it through the model at its own position. Returns (tokens [steps, S], logits,
    cache); the host reads a row's tokens up to where its request ends (a slot whose request ended mid-call ran
    on for the rest of it: those tokens are dropped, and its state is reset before the slot is reused).
    keep_states=False lets inactive slots' Mamba states change: only when none holds a prompt half fed."""
    sampling = (temperature_S, top_k_S, top_p_S, seed_S)

    def body(k, carry):
        tokens, logits, cache = carry
        active = active_S & (k < budget_S)
        token, logits, cache = _decode_once(model, params, cache, logits, active, sampling, step_S + k, keep_states)
        return tokens.at[k].set(token), logits, cache

    tokens = jnp.zeros((steps, logits_SxV.shape[0]), jnp.int32)
    tokens, logits, cache = jax.lax.fori_loop(0, steps, body, (tokens, logits_SxV, cache))
    return tokens, constrain(logits, (None, None)), _pinned(model.cfg, cache)  # (the loop's outputs, pinned too)


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


def compile_all(model, params, cache: HybridCache, logits_SxV, prefill_chunk: int, max_model_len: int,
                max_num_batched_tokens: int, call_lengths) -> tuple:
    """Runs every program a load can need once (each group shape, each prompt piece length, each decode call
    length, the reset) on padding rows or slot 0, which it leaves empty: (logits, cache)."""
    num_slots = cache.valid.shape[0]
    lengths = [b for b in bucket_sizes(prefill_chunk) if b < max_model_len]
    for rows in group_sizes(num_slots):
        # every group shape the engine can pick (more than one row only within max_num_batched_tokens), its
        # padding rows only (nothing is written)
        for b in [b for b in lengths if rows == 1 or rows * b <= max_num_batched_tokens]:
            logits_SxV, cache = prefill_group(model, params, cache, logits_SxV, np.full(rows, num_slots, np.int32),
                                              np.zeros((rows, b), np.int32), np.ones((rows, b), np.int32))
    for n in [n for n in piece_sizes(prefill_chunk) if n < max_model_len]:
        cache = reset_slot(model.cfg, cache, np.int32(0))
        logits_SxV, cache = prefill_slot(model, params, cache, logits_SxV, np.int32(0), np.zeros((1, n), np.int32))
    idle, zeros = np.zeros(num_slots, bool), np.zeros(num_slots, np.int32)
    sampling = (np.zeros(num_slots, np.float32), zeros, np.ones(num_slots, np.float32), zeros, zeros)
    for keep, k in [(False, k) for k in call_lengths] + [(True, max(call_lengths))]:
        out = decode_slots(model, params, cache, logits_SxV, idle, *sampling, zeros, k, keep)
        _, logits_SxV, cache = jax.block_until_ready(out)
    return logits_SxV, jax.block_until_ready(reset_slot(model.cfg, cache, np.int32(0)))
