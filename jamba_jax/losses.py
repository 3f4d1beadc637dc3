"""Language-model losses, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import jax.numpy as jnp

from common.losses import token_nll


def target_weights(input_ids_BxL, weights_BxL=None, segment_ids_BxL=None):
    """[batch, length-1] float32: 1 where position t+1 is a real target for position t.

    A target counts only when both t and t+1 are real tokens (weights 1) of the same document
    (segment id, 0 meaning padding): predicting a left-padded row's first token from a pad, or a
    packed document's first token from the previous document, is not a task.
    """
    w = jnp.ones(input_ids_BxL[:, 1:].shape, jnp.float32)
    if weights_BxL is not None:
        w = w * (weights_BxL[:, :-1] * weights_BxL[:, 1:]).astype(jnp.float32)
    if segment_ids_BxL is not None:
        same = (segment_ids_BxL[:, :-1] == segment_ids_BxL[:, 1:]) & (segment_ids_BxL[:, 1:] != 0)
        w = w * same.astype(jnp.float32)
    return w


def next_token_nll(logits_BxLxV, input_ids_BxL):
    """[batch, length-1] float32 negative log-likelihood of token t+1 given positions <= t."""
    return token_nll(logits_BxLxV[:, :-1], input_ids_BxL[:, 1:])


def next_token_loss(logits_BxLxV, input_ids_BxL, weights_BxL=None, segment_ids_BxL=None):
    """Mean next-token cross-entropy over the real targets (transformers' causal LM loss).

    Returns (loss, number of target tokens).
    """
    w = target_weights(input_ids_BxL, weights_BxL, segment_ids_BxL)
    count = jnp.sum(w)
    return jnp.sum(next_token_nll(logits_BxLxV, input_ids_BxL) * w) / jnp.maximum(count, 1.0), count
