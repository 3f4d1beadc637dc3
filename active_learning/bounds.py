"""Confidence bounds on a class's frequency, from the statistics the search keeps.

  empirical Bernstein (Maurer & Pontil 2009): for n draws z_i in [0, 1] with mean m and sample
      variance v, with probability 1 - delta the mean lies within
      m +- sqrt(2 v log(2 / delta) / n) + 7 log(2 / delta) / (3 (n - 1)).
      EGAL's importance weights are divided by the largest weight the proposal can give, so that
      they lie in [0, 1] (the authors' code divided by a fixed 20-30 while weights reach ~100).
  KL (Chernoff) bound for Bernoulli draws (the epsilon-greedy variant's uniform draws): the p with
      n KL(m || p) = log(1 / delta) on either side of m, by bisection.
Both with delta = 1 / n, as in the authors' code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bernstein(z_sum, z_sq, n, delta):
    """(lower, upper) bounds on the mean of draws in [0, 1] from their sum, sum of squares and count."""
    n = jnp.maximum(n, 2.0)
    mean = z_sum / n
    var = jnp.maximum(z_sq - n * mean**2, 0.0) / (n - 1)
    log_term = jnp.log(2.0 / delta)
    eps = jnp.sqrt(2 * var * log_term / n) + 7 * log_term / (3 * (n - 1))
    return mean - eps, mean + eps


def _kl(p, q):
    p = jnp.clip(p, 1e-12, 1 - 1e-12)
    q = jnp.clip(q, 1e-12, 1 - 1e-12)
    return p * jnp.log(p / q) + (1 - p) * jnp.log((1 - p) / (1 - q))


def kl_bounds(mean, n, delta, iterations: int = 40):
    """(lower, upper): the Bernoulli means within KL radius log(1 / delta) / n of the empirical mean."""
    radius = jnp.log(1.0 / delta) / jnp.maximum(n, 1.0)

    def search(lo, hi, inside_at_lo):
        def body(_, bounds):
            a, b = bounds
            mid = (a + b) / 2
            inside = _kl(mean, mid) <= radius
            # move the end that is on the same side (inside / outside) as mid
            a = jnp.where(inside == inside_at_lo, mid, a)
            b = jnp.where(inside == inside_at_lo, b, mid)
            return a, b

        return jax.lax.fori_loop(0, iterations, body, (lo, hi))

    upper = search(mean, jnp.ones_like(mean), True)[0]
    lower = search(jnp.zeros_like(mean), mean, False)[1]
    return jnp.where(n > 0, lower, 0.0), jnp.where(n > 0, upper, 1.0)
