"""Random picks without loops: inverse-CDF draws and weighted picks of pool points.

Notation: N pool points.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.cumsum import cumsum

CDF_BLOCK = 32  # draw() compares against blocks of this many CDF values
NEG = -1e30  # a score no point has


def draw(cdf_N, u, block: int = CDF_BLOCK):
    """Indices drawn with probability proportional to the increments of cdf_N, from uniforms u in [0, 1)
    (inverse CDF; any shape). No loop (a binary search's while loop costs more on a CPU at these sizes
    than comparisons), in two levels: against every block's last value (the number at or below v is the
    block holding the answer), then within that block: N / block + block comparisons instead of N. A
    product u x total that rounds up to the total still lands on the last point with a positive
    increment. cdf_N may end in copies of its total."""
    n = cdf_N.shape[0]
    v = jnp.minimum(u * cdf_N[-1], jnp.nextafter(cdf_N[-1], 0.0))
    rows = -(-n // block)
    blocks = jnp.pad(cdf_N, (0, rows * block - n), mode="edge").reshape(rows, block)
    row = jnp.sum(blocks[:, -1] <= v[..., None], axis=-1, dtype=jnp.int32)
    within = jnp.sum(blocks[row] <= v[..., None], axis=-1, dtype=jnp.int32)
    return row * block + within


def pick(weights_N, u):
    """An index drawn with probability proportional to weights_N (>= 0, not all 0) from one uniform u."""
    return draw(cumsum(weights_N), u)


def random_unlabeled(labeled_N, u, within_N=None):
    """A uniformly random unlabelled index (restricted to `within` when any of it is unlabelled)."""
    ok = ~labeled_N
    if within_N is not None:
        ok = jnp.where(jnp.any(ok & within_N), ok & within_N, ok)
    return pick(ok.astype(jnp.float32), u)


def best_unlabeled(labeled_N, scores_N, u):
    """argmax of scores over the unlabelled points, exact ties broken uniformly at random (a flat
    model's scores all tie: the pick must be random, not the lowest index; a small additive noise
    is no tie-break, float32 rounds most of it away)."""
    scores = jnp.where(labeled_N, NEG, scores_N)
    return pick((scores == jnp.max(scores)).astype(jnp.float32), u)
