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
  egal_nostop       the ablation of the stopping rule: egal whose classes leave the search only once
                    found (a class with no member is searched for to the end of the run).
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

import functools

import jax
import jax.numpy as jnp

from active_learning import logistic
from active_learning.draws import NEG, pick, random_unlabeled
from active_learning.search import search_round
from active_learning.state import Pool, Settings, State, found, init_state, label, split_key, where

METHODS = ("egal", "egal_nostop", "egal_thompson", "egal_eps", "random", "least_confidence", "entropy", "guided")
SEARCH_METHODS = ("egal", "egal_nostop", "egal_thompson", "egal_eps")
__all__ = ["METHODS", "Pool", "Settings", "State", "al_label", "init_state", "run", "run_seeds", "search_round"]


# --- active learning ----------------------------------------------------------------------------------------
def al_label(state: State, pool: Pool, probs_NxC, settings: Settings, method: str, u) -> State:
    """One active-learning label; u: a uniform, for the random choice the method makes (the first label,
    before any model, is uniformly random for every method)."""
    free = ~state.labeled
    uncertainty = 1.0 - jnp.max(probs_NxC, axis=-1)
    if method == "random":
        weights = free
    elif method == "egal_thompson":
        # sampled over the unlabelled points themselves (the authors' code drew positions in the
        # unlabelled subset and used them as pool indices)
        logits = jnp.where(free, settings.thompson_scale * uncertainty, NEG)
        weights = jnp.exp(logits - jnp.max(logits))
    else:  # least confidence (egal, egal_eps and the baseline) or entropy: their maxima, ties at random
        scores = uncertainty if method != "entropy" else \
            -jnp.sum(probs_NxC * jnp.log(jnp.maximum(probs_NxC, 1e-12)), axis=-1)
        scores = jnp.where(free, scores, NEG)
        weights = scores == jnp.max(scores)
    weights = jnp.where(state.n_labeled == 0, free, weights)
    return label(state, pick(weights.astype(jnp.float32), u))


def guided_round(state: State, pool: Pool, settings: Settings) -> State:
    """The oracle baseline: batch // C labels of each class (from the true labels, in random class
    order; a class with no unlabelled point left gives random ones); the rest random."""
    c = pool.p.shape[0]
    quota = settings.batch // c
    state, key = split_key(state)
    k_order, k_u = jax.random.split(key)

    def per_class(state, xs):
        cls, u_Q = xs

        def one(state, u):
            return label(state, random_unlabeled(state.labeled, u, pool.y == cls)), None

        return jax.lax.scan(one, state, u_Q)[0], None

    xs = (jnp.argsort(jax.random.uniform(k_order, (c,))), jax.random.uniform(k_u, (c, quota)))
    return jax.lax.scan(per_class, state, xs)[0]


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


FIT_SIZES = 4  # compiled sizes of the refit: round r fits the smallest that holds its batch x (r + 1) labels


def fit_sizes(settings: Settings) -> tuple[int, ...]:
    """Row counts the refit is compiled for (multiples of the batch, the last the whole budget)."""
    r = settings.rounds
    return tuple(sorted({settings.batch * -(-r * j // FIT_SIZES) for j in range(1, FIT_SIZES + 1)}))


def refit(model, pool: Pool, order, used, settings: Settings, round_index):
    """The classifier refitted on the labelled points (gathered in labelling order; unused slots weigh
    0). Round r has batch x (r + 1) labels: it fits the first rows of `order` at the smallest size of
    `fit_sizes` that holds them (a switch on the round, not on data, so under vmap it stays a branch);
    an L-BFGS step's cost is mostly proportional to its rows, and the early rounds take the most steps."""
    sizes = fit_sizes(settings)

    def at(rows):
        return lambda model: logistic.fit(model, pool.x[order[:rows]], pool.y[order[:rows]], used[:rows],
                                          settings.fit_steps, tol=settings.fit_tol)

    need = settings.batch * (round_index + 1)
    branch = jnp.sum(jnp.asarray(sizes) < need)
    return jax.lax.switch(branch, [at(rows) for rows in sizes], model)


def round_step(state: State, pool: Pool, settings: Settings, method: str, round_index):
    start = state.n_labeled
    if method in SEARCH_METHODS:
        state = search_round(state, pool, settings, method)
    if method == "guided":
        state = guided_round(state, pool, settings)
    probs = logistic.predict_proba(state.model, pool.x)

    def fill(state, u):
        return where(state.n_labeled < start + settings.batch, al_label(state, pool, probs, settings, method, u),
                      state), None

    state, key = split_key(state)
    state, _ = jax.lax.scan(fill, state, jax.random.uniform(key, (settings.batch,)))
    # Fitted on the labelled points only (gathered in labelling order; unused slots weigh 0): the same
    # objective as a 0/1 weight over the pool at budget / N of its cost. With a single class labelled
    # the intercept's optimum is infinite (scikit-learn refuses to fit): the model stays at zero (the
    # next round's uncertainty is flat, so its picks are random, as in the reference) and the test
    # predictions are that class. (Fitting it anyway keeps every vmapped seed's line search busy.)
    has = found(state, pool)
    two = jnp.sum(has) > 1
    used = jnp.where(two & (jnp.arange(state.order.shape[0]) < state.n_labeled), 1.0, 0.0)
    start_model = jax.tree.map(lambda a: jnp.where(two, a, 0.0), state.model)
    model = refit(start_model, pool, state.order, used, settings, round_index)
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
               "in_search": jnp.sum(state.in_search),
               # classes that left the search without a label: their frequency bound fell below the threshold
               "proven_rare": jnp.sum(~state.in_search & ~has)}
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

    def step(state, round_index):
        return round_step(state, pool, settings, method, round_index)

    state, metrics = jax.lax.scan(step, state, jnp.arange(settings.rounds))
    return metrics, labels_to_find_common(state, pool)


SEED_BATCH = 25  # seeds vectorised together: their fits' working set stays in the CPU's cache


@functools.partial(jax.jit, static_argnums=(1, 2))
def run_seeds(pool: Pool, settings: Settings, method: str, keys):
    """Every seed of one method in one jitted program, vmapped in groups of SEED_BATCH (the groups in a
    loop: a vmap over all seeds at once works out of cache): metrics [seeds, rounds], labels_to_find [seeds]."""
    return jax.lax.map(functools.partial(run, pool, settings, method), keys, batch_size=SEED_BATCH)
