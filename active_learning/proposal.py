"""EGAL's search proposal near a class's exemplar (Hartford et al. 2020, section 3):

    p_c(x) proportional to exp(-(||x - e_c|| / sigma_c)^2) over the pool,

mixed with the uniform distribution (a defensive mixture, weight `uniform_mix`), floored at `min_prob`
and renormalised. Drawing x ~ p_c and recording 1[y(x) = t] / (N p_c(x)) for every class t gives
unbiased estimates of every class's frequency; the mixture caps those weights at 1 / uniform_mix,
which is what makes them boundable (the authors' bare 1e-6 floor allows weights of 1e6 / N).

sigma_c: the smallest sigma whose importance weights keep an effective sample size of at least
`ess_target` x the number of draws. For weights w = 1 / (N p(x)), x ~ p, the expected ratio
(E w)^2 / E w^2 is N^2 / sum_x 1 / p(x), solved for by bisection on log sigma. (The authors'
code minimised the ESS of a few simulated draws with an unbounded scalar search.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from common.errors import UserError


class PoolError(UserError):
    """A pool, its exemplars or settings that the active-learning methods cannot run on."""


def distances(x_NxD, exemplars_CxD):
    """[C, N] Euclidean distances from each exemplar to each pool point."""
    sq = (jnp.sum(exemplars_CxD**2, -1)[:, None] + jnp.sum(x_NxD**2, -1)[None, :]
          - 2 * exemplars_CxD @ x_NxD.T)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def kernel_probs(d_N, sigma, uniform_mix: float, min_prob: float):
    """p over the pool for one exemplar's distances (see the module docstring)."""
    logits = -((d_N / sigma) ** 2)
    k = jnp.exp(logits - jnp.max(logits))
    n = d_N.shape[0]
    p = (1 - uniform_mix) * k / jnp.sum(k) + uniform_mix / n
    p = jnp.maximum(p, min_prob)
    return p / jnp.sum(p)


def ess_ratio(p_N):
    n = p_N.shape[0]
    return n * n / jnp.sum(1.0 / p_N)


def choose_sigma(d_N, ess_target: float, uniform_mix: float, min_prob: float, iterations: int = 60) -> float:
    """The smallest sigma (bisection on log sigma) whose proposal keeps ess_ratio >= ess_target."""
    d = np.asarray(d_N, np.float64)
    lo, hi = np.log(max(np.quantile(d, 0.001), 1e-6)), np.log(max(d.max(), 1e-6) * 100)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        r = float(ess_ratio(kernel_probs(jnp.asarray(d, jnp.float32), np.exp(mid), uniform_mix, min_prob)))
        lo, hi = (lo, mid) if r >= ess_target else (mid, hi)
    return float(np.exp(hi))


def proposals(x_NxD, exemplars_CxD, ess_target: float = 0.25, uniform_mix: float = 0.1, min_prob: float = 1e-6):
    """(p [C, N] float32, sigma [C], largest importance weight M) for a pool and its exemplars."""
    if not 0.0 < uniform_mix < ess_target <= 1.0:
        raise PoolError(f"proposal settings uniform_mix={uniform_mix}, ess_target={ess_target}: need "
                        "0 < uniform_mix < ess_target <= 1 (the mixture alone gives an ESS ratio of uniform_mix)")
    d = distances(jnp.asarray(x_NxD, jnp.float32), jnp.asarray(exemplars_CxD, jnp.float32))
    sigmas = [choose_sigma(d[c], ess_target, uniform_mix, min_prob) for c in range(d.shape[0])]
    p = jnp.stack([kernel_probs(d[c], s, uniform_mix, min_prob) for c, s in enumerate(sigmas)])
    n = x_NxD.shape[0]
    return p, jnp.asarray(sigmas, jnp.float32), float(1.0 / (n * float(jnp.min(p))))
