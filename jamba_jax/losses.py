"""Language-model losses, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits_BxLxV, input_ids_BxL, weights_BxL=None):
    """Mean cross-entropy of predicting token t+1 from position t (transformers' causal LM loss).

    weights_BxL: 1 for real tokens, 0 for padding. A target t+1 counts only when both t and t+1
    are real: predicting a left-padded row's first real token from a pad position is not a task
    (and pad positions' logits are arbitrary). Returns (loss, number of target tokens).
    """
    logits = logits_BxLxV[:, :-1].astype(jnp.float32)
    targets = input_ids_BxL[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if weights_BxL is None:
        w = jnp.ones_like(nll)
    else:
        w = (weights_BxL[:, :-1] * weights_BxL[:, 1:]).astype(jnp.float32)
    count = jnp.sum(w)
    return jnp.sum(nll * w) / jnp.maximum(count, 1.0), count
