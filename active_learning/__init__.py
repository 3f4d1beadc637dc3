"""Exemplar-guided active learning (Hartford et al., NeurIPS 2020) and its baselines in JAX: every seed
of a method is one vmapped, jitted labelling run (`strategies.run_seeds`)."""

from active_learning import logistic
from active_learning.pools import gaussian_blobs, make_pool
from active_learning.proposal import PoolError
from active_learning.strategies import METHODS, Pool, Settings, run, run_seeds

__all__ = ["METHODS", "Pool", "PoolError", "Settings", "gaussian_blobs", "logistic", "make_pool", "run", "run_seeds"]
