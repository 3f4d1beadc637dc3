"""The one cross-entropy: per-position negative log-likelihood of integer targets, in float32
whatever the logits' dtype. Models and tasks weight and sum it as their objectives say."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV, targets_BxL):
    """-log softmax(logits)[target], float32, shape of the targets."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


LOSS_CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk of positions in `chunked_token_nll`


def chunked_token_nll(hidden_BxLxE, head_ExV, targets_BxL, chunk_bytes: int | None = None):
    """token_nll(hidden @ head, targets) [batch, length] without a [batch, length, vocab] array: the positions
    go through the LM head and the loss a chunk at a time (as many as keep a chunk's float32 logits within
    `chunk_bytes`, default LOSS_CHUNK_BYTES read at trace time), and the backward pass recomputes each
    chunk's logits, so the head's and the loss's memory does not grow with the length. Same numbers as
    token_nll(hidden @ head, targets)."""
    b, length, e = hidden_BxLxE.shape
    chunk = int(max(1, min(length, (chunk_bytes or LOSS_CHUNK_BYTES) // (b * head_ExV.shape[1] * 4))))
    n = -(-length // chunk)
    if n == 1:  # one chunk: nothing to recompute
        return token_nll(hidden_BxLxE @ head_ExV, targets_BxL)
    pad = n * chunk - length
    h = jnp.pad(hidden_BxLxE, [(0, 0), (0, pad), (0, 0)]).reshape(b, n, chunk, e).swapaxes(0, 1)
    t = jnp.pad(targets_BxL, [(0, 0), (0, pad)]).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(head, h_BxCxE, t_BxC):
        return token_nll(h_BxCxE @ head, t_BxC)

    nll = jax.lax.map(lambda ht: one(head_ExV, *ht), (h, t))  # [n, batch, chunk]
    return nll.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]
