"""What a labelling run carries (`State`), what it runs over (`Pool`) and its settings, with the small
state updates every strategy shares.

Notation: N pool points, D embedding features, C classes, T test points.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from active_learning import logistic


@dataclasses.dataclass(frozen=True)
class Settings:
    batch: int = 20  # labels per round
    rounds: int = 10  # rounds per run
    threshold: float = 0.1  # a class is common above this frequency
    epsilon: float = 0.1  # the epsilon-greedy variant's exploration rate
    thompson_scale: float = 10.0  # egal_thompson: sharpness of the uncertainty sampling
    fit_steps: int = 40  # L-BFGS steps per refit at most (warm-started) ...
    fit_tol: float = 1e-4  # ... fewer once max |gradient| <= fit_tol x C x labels (scikit-learn's tol)
    max_draws: int = 4096  # proposal draws per search label before a uniformly random unlabelled point


class Pool(NamedTuple):
    x: jax.Array  # [N, D] pool embeddings
    y: jax.Array  # [N] int32 labels (the oracle, read once a point is labelled)
    x_test: jax.Array  # [T, D]
    y_test: jax.Array  # [T]
    p: jax.Array  # [C, N] search proposals
    d: jax.Array  # [C, N] distances to the exemplars
    max_weight: jax.Array  # scalar M: the largest importance weight any proposal gives
    common: jax.Array  # [C] bool: frequency in the pool above the threshold
    cdf: jax.Array  # [C, >= N] cumulative sums of p (`draws.draw` takes them): the search draws by inverse CDF


class State(NamedTuple):
    key: jax.Array
    labeled: jax.Array  # [N] bool
    order: jax.Array  # [budget] int32: labelled points in labelling order
    n_labeled: jax.Array  # int32
    in_search: jax.Array  # [C] bool
    z_sum: jax.Array  # [C] importance statistics (values in [0, 1]): sum ...
    z_sq: jax.Array  # [C] ... sum of squares ...
    n_draws: jax.Array  # ... and the number of draws
    r_sum: jax.Array  # [C] egal_eps: class counts of its uniformly random search labels ...
    r_n: jax.Array  # ... and their number
    model: logistic.Logistic


def init_state(pool: Pool, settings: Settings, key) -> State:
    n, dim = pool.x.shape
    c = pool.p.shape[0]
    f = jnp.float32
    return State(key, jnp.zeros((n,), bool), jnp.zeros((settings.batch * settings.rounds,), jnp.int32),
                 jnp.zeros((), jnp.int32), jnp.ones((c,), bool), jnp.zeros((c,), f), jnp.zeros((c,), f),
                 jnp.zeros((), f), jnp.zeros((c,), f), jnp.zeros((), f), logistic.init(dim, c))


def where(cond, new, old):
    """`new` where cond holds, else `old`, leaf by leaf (a step taken only by some vmapped runs)."""
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def split_key(state: State) -> tuple[State, jax.Array]:
    key, sub = jax.random.split(state.key)
    return state._replace(key=key), sub


def label(state: State, s) -> State:
    """The state with point s labelled."""
    return state._replace(labeled=state.labeled.at[s].set(True), order=state.order.at[state.n_labeled].set(s),
                          n_labeled=state.n_labeled + 1)


def found(state: State, pool: Pool):
    """[C] bool: classes with at least one label."""
    return jnp.zeros(pool.p.shape[0], bool).at[pool.y].max(state.labeled)
