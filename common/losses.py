"""The one cross-entropy: per-position negative log-likelihood of integer targets, in float32
whatever the logits' dtype. Models and tasks weight and sum it as their objectives say."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV, targets_BxL):
    """-log softmax(logits)[target], float32, shape of the targets."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
