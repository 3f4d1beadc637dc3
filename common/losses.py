"""The one cross-entropy: per-position negative log-likelihood of integer targets, in float32
whatever the logits' dtype, with or without the [B, L, V] logits in memory. Models and tasks weight
and sum it as their objectives say."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from common.sharding import axes_size, current_mesh, fitted_spec, spec_axes


def token_nll(logits_BxLxV, targets_BxL):
    """-log softmax(logits)[target], float32, shape of the targets."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


LOSS_CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk of positions in `chunked_nll`


def chunked_nll(logits_fn, per_position: tuple, shared, targets_BxL, vocab_size: int, chunk_bytes: int | None = None):
    """token_nll(logits_fn(shared, *per_position), targets) [B, L] without a [B, L, V] array: the positions go
    through `logits_fn` and the loss a chunk at a time (as many as keep a chunk's float32 logits within
    `chunk_bytes`, default LOSS_CHUNK_BYTES read at trace time), and the backward pass recomputes each chunk's
    logits, so the head's and the loss's memory does not grow with the length.

    per_position: arrays [B, L, ...] cut into chunks of positions; shared: a pytree every chunk reads whole
    (the LM heads); logits_fn(shared, *chunks [B, C, ...]) -> logits [B, C, V].

    Under a mesh that splits the positions into slices (context parallelism), each device chunks its own
    slice: the slices become rows ([B, L] -> [slices x B, L / slices]), so no chunk spans devices."""
    mesh = current_mesh()
    spec = None if mesh is None else fitted_spec(targets_BxL.shape, ("batch", "length"), mesh)
    if spec is None or spec[1] is None:
        return _chunked_rows(logits_fn, per_position, shared, targets_BxL, vocab_size, chunk_bytes)
    b, length = targets_BxL.shape
    n = axes_size(mesh, spec_axes(spec[1]))

    def as_rows(x_BxL, to_rows=True):  # [B, L, ...] <-> [n x B, L / n, ...], each device's slice its rows
        rows_first = NamedSharding(mesh, P(spec_axes(spec[1]) + spec_axes(spec[0]), *(None,) * (x_BxL.ndim - 1)))
        if to_rows:
            x = x_BxL.reshape(b, n, length // n, *x_BxL.shape[2:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x.reshape(n * b, *x.shape[2:]), rows_first)
        x = jax.lax.with_sharding_constraint(x_BxL, rows_first).reshape(n, b, length // n, *x_BxL.shape[2:])
        return x.swapaxes(0, 1).reshape(b, length, *x_BxL.shape[2:])

    nll = _chunked_rows(logits_fn, tuple(as_rows(x) for x in per_position), shared, as_rows(targets_BxL), vocab_size,
                        chunk_bytes)
    return as_rows(nll, to_rows=False)


def _chunked_rows(logits_fn, per_position: tuple, shared, targets_BxL, vocab_size: int, chunk_bytes: int | None):
    """chunked_nll with the positions of every row on one device."""
    b, length = targets_BxL.shape
    chunk = int(max(1, min(length, (chunk_bytes or LOSS_CHUNK_BYTES) // (b * vocab_size * 4))))
    n = -(-length // chunk)
    if n == 1:  # one chunk: nothing to recompute
        return token_nll(logits_fn(shared, *per_position), targets_BxL)
    pad = n * chunk - length

    def chunks(x_BxL):  # [B, L, ...] -> [n, B, C, ...]
        x = jnp.pad(x_BxL, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxL.ndim - 2))
        return x.reshape(b, n, chunk, *x_BxL.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(shared, xs_C, t_BxC):
        return token_nll(logits_fn(shared, *xs_C), t_BxC)

    nll = jax.lax.map(lambda xt: one(shared, *xt), (tuple(chunks(x) for x in per_position), chunks(targets_BxL)))
    return nll.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]


def chunked_token_nll(hidden_BxLxE, head_ExV, targets_BxL, chunk_bytes: int | None = None):
    """token_nll(hidden @ head, targets) [B, L] a chunk of positions at a time (`chunked_nll`): the same
    numbers without a [B, L, V] array."""
    return chunked_nll(lambda head, h: h @ head, (hidden_BxLxE,), head_ExV, targets_BxL, head_ExV.shape[1],
                       chunk_bytes)
