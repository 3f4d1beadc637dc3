"""Pools the active-learning methods run on: embeddings, labels, one exemplar per class and a
balanced test set, checked and turned into a `strategies.Pool` (proposals, distances, which classes
are common). Also the synthetic pools of the tests: Gaussian blobs with chosen class frequencies."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from active_learning.draws import CDF_BLOCK
from active_learning.proposal import PoolError, distances, proposals
from active_learning.state import Pool, Settings


def make_pool(x, y, exemplars, x_test, y_test, settings: Settings, ess_target: float = 0.25,
              uniform_mix: float = 0.1, min_prob: float = 1e-6, name: str = "pool") -> Pool:
    """A Pool from numpy arrays; names what cannot work (a user error, one line)."""
    x, x_test, exemplars = (np.asarray(a, np.float32) for a in (x, x_test, exemplars))
    y, y_test = np.asarray(y, np.int64), np.asarray(y_test, np.int64)
    num_classes = len(exemplars)  # one exemplar per class: a class may have no pool or test points at all
    if not 0.0 < settings.threshold < 1.0:
        raise PoolError(f"threshold={settings.threshold}: a class frequency threshold must lie in (0, 1)")
    if settings.fit_steps < 1 or not settings.fit_tol >= 0.0:
        raise PoolError(f"fit_steps={settings.fit_steps}, fit_tol={settings.fit_tol}: at least one L-BFGS step and a "
                        "gradient tolerance >= 0 (0: every step) are expected")
    budget = settings.batch * settings.rounds
    if budget > len(x):
        raise PoolError(f"{name}: {len(x)} points in the pool but the budget is {settings.batch} x "
                        f"{settings.rounds} = {budget} labels; fewer rounds or a larger pool")
    labels = np.concatenate([y, y_test])
    if exemplars.ndim != 2 or exemplars.shape[1] != x.shape[1] or labels.min() < 0 or labels.max() >= num_classes:
        missing = sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))
        raise PoolError(f"{name}: {len(exemplars)} exemplars of shape {exemplars.shape[1:]} for labels up to "
                        f"{int(labels.max())} (labels {missing} have none); one exemplar of width {x.shape[1]} per "
                        "class is expected")
    for what, a in (("pool", x), ("test", x_test), ("exemplar", exemplars)):
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            raise PoolError(f"{name}: {int(bad.sum())} {what} embeddings hold NaN or inf "
                            f"(first row {int(np.argmax(bad))})")
    freq = np.bincount(y, minlength=num_classes) / len(y)
    p, _, max_weight = proposals(x, exemplars, ess_target, uniform_mix, min_prob)
    return Pool(jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(x_test), jnp.asarray(y_test, jnp.int32), p,
                distances(jnp.asarray(x), jnp.asarray(exemplars)), jnp.asarray(max_weight, jnp.float32),
                jnp.asarray(freq > settings.threshold),
                jnp.pad(jnp.cumsum(p, axis=1), ((0, 0), (0, -len(x) % CDF_BLOCK)), mode="edge"))


def gaussian_blobs(freqs, n: int, dim: int = 8, separation: float = 4.0, n_test: int = 100, seed: int = 0):
    """(x, y, exemplars, x_test, y_test): class c around a random mean (separation apart on average)
    with frequency freqs[c] in the pool; the exemplar is a noisy copy of the mean; a balanced test set."""
    r = np.random.RandomState(seed)
    c = len(freqs)
    means = r.randn(c, dim) * separation / np.sqrt(2)
    counts = np.maximum(np.round(np.asarray(freqs) * n).astype(int), 1)
    y = np.repeat(np.arange(c), counts)
    x = means[y] + r.randn(len(y), dim)
    perm = r.permutation(len(y))
    y_test = np.repeat(np.arange(c), n_test // c)
    return (x[perm], y[perm], means + 0.3 * r.randn(c, dim), means[y_test] + r.randn(len(y_test), dim), y_test)
