"""Exemplar-guided active learning (Hartford, Leyton-Brown, Raviv, Padnos, Lev, Lenz, NeurIPS 2020)
and its baselines, as pure functions of (state, key): `jax.vmap` runs every seed of a method and
`jax.jit` a whole labelling run (`run`).

Each round labels `batch` points, then refits the classifier (`active_learning.logistic`).

  egal              while classes remain in the search, each gets batch // C labels from its
                    exemplar's proposal (`active_learning.proposal`): draws x ~ p_c until one is
                    unlabelled (draws of labelled points cost nothing and still count), every draw
                    adding 1[y(x) = t] / (N p_c(x)) / M to the frequency statistics of every class t
                    (M: the largest possible weight, so the values lie in [0, 1]). After each class,
                    empirical-Bernstein bounds with delta = 1 / n take a class out of the search once
                    its upper bound is below the threshold (rare: ignored) or its lower bound above it
                    (common); a class with a label leaves too (found). The rest of the batch, and every
                    batch once the search is over, is least-confidence active learning.
  egal_thompson     the same search; the active-learning part samples points with probability
                    proportional to exp(scale x (1 - max p)) among the unlabelled ones.
  egal_eps          the epsilon-greedy search: each search label is, with probability epsilon, a
                    uniformly random unlabelled point (its label feeds KL-Chernoff frequency bounds),
                    else the unlabelled point nearest the exemplar; then least confidence.
  random, least_confidence, entropy
                    the usual baselines (random scores while no classifier exists yet).
  guided            the oracle: batch // C points of each class present, picked from the true labels.

The authors' code had defects these avoid (tests/test_active_learning.py pins each): its greedy
search sorted -distance ascending (the farthest points); its Thompson step drew positions in the
unlabelled subset but indexed the whole pool with them; its search stopped with one class still
unresolved (`> 1`); it bounded weights up to ~100 as if they lay in [0, 1]; it replaced the
dictionary exemplars with random pool examples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from active_learning import logistic
from active_learning.bounds import bernstein, kl_bounds

METHODS = ("egal", "egal_thompson", "egal_eps", "random", "least_confidence", "entropy", "guided")
SEARCH_METHODS = ("egal", "egal_thompson", "egal_eps")
_NEG = -1e30


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


def _where(cond, new, old):
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def _split(state: State) -> tuple[State, jax.Array]:
    key, sub = jax.random.split(state.key)
    return state._replace(key=key), sub


def _label(state: State, s) -> State:
    return state._replace(labeled=state.labeled.at[s].set(True), order=state.order.at[state.n_labeled].set(s),
                          n_labeled=state.n_labeled + 1)


def _random_unlabeled(state: State, key, within=None):
    """A uniformly random unlabelled index (restricted to `within` when any of it is unlabelled)."""
    ok = ~state.labeled
    if within is not None:
        ok = jnp.where(jnp.any(ok & within), ok & within, ok)
    return jax.random.categorical(key, jnp.where(ok, 0.0, _NEG))


def _best_unlabeled(state: State, scores, key):
    """argmax of scores over the unlabelled points, exact ties broken uniformly at random (a flat
    model's scores all tie: the pick must be random, not the lowest index; a small additive noise
    is no tie-break, float32 rounds most of it away)."""
    scores = jnp.where(state.labeled, _NEG, scores)
    return jax.random.categorical(key, jnp.where(scores == jnp.max(scores), 0.0, _NEG))


def found(state: State, pool: Pool):
    """[C] bool: classes with at least one label."""
    return jnp.zeros(pool.p.shape[0], bool).at[pool.y].max(state.labeled)


# --- the search ------------------------------------------------------------------------------------------
def draw(cdf_N, key):
    """An index drawn with probability proportional to the increments of cdf_N (inverse CDF)."""
    return jnp.minimum(jnp.searchsorted(cdf_N, jax.random.uniform(key) * cdf_N[-1], side="right"),
                       cdf_N.shape[0] - 1)


def search_importance(state: State, pool: Pool, c, settings: Settings) -> State:
    """One label from class c's proposal; every draw feeds the importance statistics."""
    n = pool.x.shape[0]
    classes = jnp.arange(pool.p.shape[0])
    cdf = jnp.cumsum(pool.p[c])  # draws by inverse CDF: O(log N) each (a categorical draw is O(N))

    def cond(carry):
        _, draws, done, _, _, _, _ = carry
        return (~done) & (draws < settings.max_draws)

    def body(carry):
        key, draws, _, _, z_sum, z_sq, count = carry
        key, sub = jax.random.split(key)
        s = draw(cdf, sub)
        z = (pool.y[s] == classes) / (n * pool.p[c, s]) / pool.max_weight  # in [0, 1]
        return key, draws + 1, ~state.labeled[s], s, z_sum + z, z_sq + z * z, count + 1.0

    state, key = _split(state)
    init = (key, jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), jnp.int32), state.z_sum, state.z_sq,
            state.n_draws)
    key, _, done, s, z_sum, z_sq, count = jax.lax.while_loop(cond, body, init)
    s = jnp.where(done, s, _random_unlabeled(state, key))
    return _label(state._replace(z_sum=z_sum, z_sq=z_sq, n_draws=count), s)


def search_epsilon_greedy(state: State, pool: Pool, c, settings: Settings) -> State:
    """One label: a uniformly random unlabelled point with probability epsilon (its class feeds the
    frequency bounds), else the unlabelled point nearest class c's exemplar."""
    state, key = _split(state)
    k1, k2, k3 = jax.random.split(key, 3)
    explore = jax.random.uniform(k1) < settings.epsilon
    s = jnp.where(explore, _random_unlabeled(state, k2), _best_unlabeled(state, -pool.d[c], k3))
    onehot = (pool.y[s] == jnp.arange(pool.p.shape[0])).astype(jnp.float32)
    state = state._replace(r_sum=state.r_sum + jnp.where(explore, onehot, 0.0),
                           r_n=state.r_n + explore.astype(jnp.float32))
    return _label(state, s)


def update_search(state: State, pool: Pool, settings: Settings, method: str) -> State:
    """Classes leave the search once found, or once their frequency bounds clear the threshold."""
    if method == "egal_eps":
        lo, hi = kl_bounds(state.r_sum / jnp.maximum(state.r_n, 1.0), state.r_n, 1.0 / (1.0 + state.r_n))
        ready = state.r_n > 0
    else:
        n = state.n_draws
        lo, hi = bernstein(state.z_sum, state.z_sq, n, 1.0 / jnp.maximum(n, 2.0))
        lo, hi = lo * pool.max_weight, hi * pool.max_weight
        ready = n >= 2
    resolved = ready & ((lo > settings.threshold) | (hi < settings.threshold))
    return state._replace(in_search=state.in_search & ~resolved & ~found(state, pool))


def search_round(state: State, pool: Pool, settings: Settings, method: str) -> State:
    """Each class still in the search (in random order) gets batch // C search labels; bounds are
    updated after each class. Nothing happens once no class is in the search."""
    c = pool.p.shape[0]
    quota = settings.batch // c
    search = search_epsilon_greedy if method == "egal_eps" else search_importance
    state, key = _split(state)

    def per_class(state, cls):
        active = state.in_search[cls]

        def one(state, _):
            return _where(active, search(state, pool, cls, settings), state), None

        state, _ = jax.lax.scan(one, state, None, length=quota)
        return _where(active, update_search(state, pool, settings, method), state), None

    state, _ = jax.lax.scan(per_class, state, jax.random.permutation(key, c))
    return state


# --- active learning ----------------------------------------------------------------------------------------
def al_label(state: State, pool: Pool, probs_NxC, settings: Settings, method: str) -> State:
    state, key = _split(state)
    k1, k2 = jax.random.split(key)
    uncertainty = 1.0 - jnp.max(probs_NxC, axis=-1)
    untrained = state.n_labeled == 0
    if method == "random":
        return _label(state, _random_unlabeled(state, k1))
    if method == "entropy":
        scores = -jnp.sum(probs_NxC * jnp.log(jnp.maximum(probs_NxC, 1e-12)), axis=-1)
    elif method == "egal_thompson":
        # sampled over the unlabelled points themselves (the authors' code drew positions in the
        # unlabelled subset and used them as pool indices)
        s = jax.random.categorical(k1, jnp.where(state.labeled, _NEG, settings.thompson_scale * uncertainty))
        return _label(state, jnp.where(untrained, _random_unlabeled(state, k2), s))
    else:  # least confidence (egal, egal_eps and the baseline)
        scores = uncertainty
    s = _best_unlabeled(state, scores, k1)
    return _label(state, jnp.where(untrained, _random_unlabeled(state, k2), s))


def guided_round(state: State, pool: Pool, settings: Settings) -> State:
    """The oracle baseline: batch // C labels of each class (from the true labels, in random class
    order; a class with no unlabelled point left gives random ones); the rest random."""
    c = pool.p.shape[0]
    quota = settings.batch // c
    state, key = _split(state)

    def per_class(state, cls):
        def one(state, _):
            state, k = _split(state)
            return _label(state, _random_unlabeled(state, k, within=pool.y == cls)), None

        return jax.lax.scan(one, state, None, length=quota)[0], None

    return jax.lax.scan(per_class, state, jax.random.permutation(key, c))[0]


# --- a labelling run -------------------------------------------------------------------------------------------
def macro_f1(pred, y, num_classes):
    """Mean F1 over the classes present in y."""
    cls = jnp.arange(num_classes)[:, None]
    tp = jnp.sum((pred == cls) & (y == cls), axis=1)
    fp = jnp.sum((pred == cls) & (y != cls), axis=1)
    fn = jnp.sum((pred != cls) & (y == cls), axis=1)
    present = jnp.sum(y == cls, axis=1) > 0
    f1 = 2 * tp / jnp.maximum(2 * tp + fp + fn, 1)
    return jnp.sum(jnp.where(present, f1, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def round_step(state: State, pool: Pool, settings: Settings, method: str):
    start = state.n_labeled
    if method in SEARCH_METHODS:
        state = search_round(state, pool, settings, method)
    if method == "guided":
        state = guided_round(state, pool, settings)
    probs = logistic.predict_proba(state.model, pool.x)

    def fill(state, _):
        return _where(state.n_labeled < start + settings.batch, al_label(state, pool, probs, settings, method),
                      state), None

    state, _ = jax.lax.scan(fill, state, None, length=settings.batch)
    # Fitted on the labelled points only (gathered in labelling order; unused slots weigh 0): the same
    # objective as a 0/1 weight over the pool at budget / N of its cost. With a single class labelled
    # the intercept's optimum is infinite (scikit-learn refuses to fit): the model stays at zero (the
    # next round's uncertainty is flat, so its picks are random, as in the reference) and the test
    # predictions are that class. (Fitting it anyway keeps every vmapped seed's line search busy.)
    has = found(state, pool)
    two = jnp.sum(has) > 1
    used = jnp.where(two & (jnp.arange(state.order.shape[0]) < state.n_labeled), 1.0, 0.0)
    start_model = jax.tree.map(lambda a: jnp.where(two, a, 0.0), state.model)
    model = logistic.fit(start_model, pool.x[state.order], pool.y[state.order], used, settings.fit_steps,
                         tol=settings.fit_tol)
    state = state._replace(model=model)
    test_logits = jnp.where(two, logistic.logits(model, pool.x_test), jnp.where(has, 0.0, -1.0)[None, :])
    pred = jnp.argmax(test_logits, axis=-1)
    c = pool.p.shape[0]
    on_common = pool.common[pool.y_test]
    metrics = {"labels": state.n_labeled, "accuracy": jnp.mean(pred == pool.y_test),
               "common_accuracy": jnp.sum((pred == pool.y_test) & on_common) / jnp.maximum(jnp.sum(on_common), 1),
               "macro_f1": macro_f1(pred, pool.y_test, c),
               "rare_labels": jnp.sum(state.labeled & ~pool.common[pool.y]),
               "classes_found": jnp.sum(has), "common_found": jnp.sum(has & pool.common),
               "in_search": jnp.sum(state.in_search)}
    return state, metrics


def labels_to_find_common(state: State, pool: Pool):
    """Labels spent until every common class had one (the budget + 1 if some never did)."""
    budget = state.order.shape[0]
    pos = jnp.arange(budget)
    first = jnp.full(pool.p.shape[0], budget, jnp.int32).at[pool.y[state.order]].min(
        jnp.where(pos < state.n_labeled, pos, budget))
    return jnp.max(jnp.where(pool.common, first, 0)) + 1


def run(pool: Pool, settings: Settings, method: str, key):
    """One labelling run: ({metric: [rounds]}, labels_to_find_common)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}; expected one of {METHODS}")
    state = init_state(pool, settings, key)

    def step(state, _):
        return round_step(state, pool, settings, method)

    state, metrics = jax.lax.scan(step, state, None, length=settings.rounds)
    return metrics, labels_to_find_common(state, pool)


SEED_BATCH = 25  # seeds vectorised together: their fits' working set stays in the CPU's cache


@functools.partial(jax.jit, static_argnums=(1, 2))
def run_seeds(pool: Pool, settings: Settings, method: str, keys):
    """Every seed of one method in one jitted program (vmapped in groups of SEED_BATCH, the groups in
    a loop: 100 seeds in one vmap ran 3x slower per seed than 25, their working set out of cache):
    metrics [seeds, rounds], labels_to_find [seeds]."""
    return jax.lax.map(functools.partial(run, pool, settings, method), keys, batch_size=SEED_BATCH)
