"""SenseBERT's pre-training losses (section 3.2), summed over target positions.

  L_MLM      = -log p(w | context)                            at every masked piece
  L_allowed  = -log sum_{s in A(w)} p(s | context)            at the last piece of each masked word
  L_reg      = -sum_{s in A(w)} (1 / |A(w)|) log p(s | context)   (same positions)

with p(s | context) the softmax of the supersense head over the 45 supersenses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.losses import token_nll

_F32 = jnp.float32


def masked_lm_sum(logits_BxLxV, targets_BxL, weights_BxL):
    """Summed cross-entropy of the targets at weighted positions (float32)."""
    return jnp.sum(token_nll(logits_BxLxV, targets_BxL) * weights_BxL)


def supersense_loss_sums(logits_BxLxS, allowed_BxLxS, weights_BxL):
    """(summed L_allowed, summed L_reg) over positions with weight 1 (each must have a non-empty A)."""
    logp = jax.nn.log_softmax(logits_BxLxS.astype(_F32), axis=-1)
    allowed = allowed_BxLxS.astype(bool)
    allowed = allowed | ~jnp.any(allowed, axis=-1, keepdims=True)  # empty rows (weight 0): no -inf, no NaN grads
    l_allowed = -jax.nn.logsumexp(jnp.where(allowed, logp, -jnp.inf), axis=-1)
    n = jnp.maximum(jnp.sum(allowed, axis=-1), 1)
    l_reg = -jnp.sum(jnp.where(allowed, logp, 0.0), axis=-1) / n
    w = weights_BxL.astype(_F32)
    return jnp.sum(jnp.where(w > 0, l_allowed, 0.0) * w), jnp.sum(jnp.where(w > 0, l_reg, 0.0) * w)
