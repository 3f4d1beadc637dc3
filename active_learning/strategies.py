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
    cdf: jax.Array  # [C, >= N] cumulative sums of p, padded as draw() takes them: the search draws by inverse CDF


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


CDF_BLOCK = 32  # draw() compares against blocks of this many CDF values


def draw(cdf_N, u, block: int = CDF_BLOCK):
    """Indices drawn with probability proportional to the increments of cdf_N, from uniforms u in [0, 1)
    (inverse CDF; any shape). No loop: a binary search's while loop costs more on a CPU at these sizes
    than comparisons. Two levels of them: against every block's last value (the number at or below v is
    the block holding the answer), then within that block, N / block + block comparisons instead of N.
    A product u x total that rounds up to the total still lands on the last point with a positive
    increment. cdf_N may end in copies of its total (a multiple of the block long: no padding here)."""
    n = cdf_N.shape[0]
    v = jnp.minimum(u * cdf_N[-1], jnp.nextafter(cdf_N[-1], 0.0))
    rows = -(-n // block)
    blocks = jnp.pad(cdf_N, (0, rows * block - n), mode="edge").reshape(rows, block)
    row = jnp.sum(blocks[:, -1] <= v[..., None], axis=-1, dtype=jnp.int32)
    within = jnp.sum(blocks[row] <= v[..., None], axis=-1, dtype=jnp.int32)
    return row * block + within


def _cumsum(w_N, block: int = CDF_BLOCK):
    """jnp.cumsum in two small matmuls (within blocks, then over the blocks' totals), padded with copies of
    the total to a multiple of the block, as draw() takes it: XLA:CPU's cumulative sum is a
    reduce-window, ~10x slower at a few hundred points, and a pick per label needs one."""
    n = w_N.shape[0]
    rows = -(-n // block)
    w = jnp.pad(w_N, (0, rows * block - n)).reshape(rows, block)
    within = w @ jnp.triu(jnp.ones((block, block), w.dtype))
    before = jnp.tril(jnp.ones((rows, rows), w.dtype), -1) @ within[:, -1]
    return (within + before[:, None]).reshape(-1)


def _pick(weights_N, u):
    """An index drawn with probability proportional to weights_N (>= 0, not all 0) from one uniform u."""
    return draw(_cumsum(weights_N), u)


def _random_unlabeled(state: State, u, within=None):
    """A uniformly random unlabelled index (restricted to `within` when any of it is unlabelled)."""
    ok = ~state.labeled
    if within is not None:
        ok = jnp.where(jnp.any(ok & within), ok & within, ok)
    return _pick(ok.astype(jnp.float32), u)


def _best_unlabeled(state: State, scores, u):
    """argmax of scores over the unlabelled points, exact ties broken uniformly at random (a flat
    model's scores all tie: the pick must be random, not the lowest index; a small additive noise
    is no tie-break, float32 rounds most of it away)."""
    scores = jnp.where(state.labeled, _NEG, scores)
    return _pick((scores == jnp.max(scores)).astype(jnp.float32), u)


def found(state: State, pool: Pool):
    """[C] bool: classes with at least one label."""
    return jnp.zeros(pool.p.shape[0], bool).at[pool.y].max(state.labeled)


# --- the search ------------------------------------------------------------------------------------------
# Random numbers are drawn a round at a time (`search_round`, `round_step`) and handed to the per-label
# steps: on XLA:CPU every call of the threefry generator is a loop of its own (~50 us under vmap), and
# one per draw and per label was a third of a run.
DRAW_BLOCK = 8  # proposal draws made at once per search label; more, a block at a time, only if all hit labelled points


def search_importance(state: State, pool: Pool, c, settings: Settings, u, key) -> State:
    """One label from class c's proposal: draws x ~ p_c until one is unlabelled, every draw (the
    labelled ones too) feeding the importance statistics. u: DRAW_BLOCK + 1 uniforms (the first block
    of draws; the fallback pick after max_draws); key: for further blocks."""
    n = pool.x.shape[0]
    classes = jnp.arange(pool.p.shape[0])
    cdf = pool.cdf[c]
    slots = jnp.arange(DRAW_BLOCK)

    def block(u_B, drawn):
        """DRAW_BLOCK draws in order, up to and including the first unlabelled one (and max_draws)."""
        s_B = draw(cdf, u_B)
        allowed = slots < settings.max_draws - drawn
        free = ~state.labeled[s_B] & allowed
        hit = jnp.any(free)
        used = allowed & (slots <= jnp.where(hit, jnp.argmax(free), DRAW_BLOCK))
        z_BxC = jnp.where(used[:, None] & (pool.y[s_B][:, None] == classes),
                          1.0 / (n * pool.p[c, s_B] * pool.max_weight)[:, None], 0.0)  # in [0, 1]
        return hit, s_B[jnp.argmax(free)], z_BxC.sum(0), (z_BxC * z_BxC).sum(0), jnp.sum(used)

    def cond(carry):
        return ~carry[1] & (carry[5] < settings.max_draws)

    def body(carry):
        i, _, _, z_sum, z_sq, drawn = carry
        hit, s, z, zz, m = block(jax.random.uniform(jax.random.fold_in(key, i), (DRAW_BLOCK,)), drawn)
        return i + 1, hit, s, z_sum + z, z_sq + zz, drawn + m

    hit, s, z, zz, m = block(u[:DRAW_BLOCK], 0)
    init = (jnp.ones((), jnp.int32), hit, s, z, zz, m)
    _, hit, s, z, zz, m = jax.lax.while_loop(cond, body, init)
    s = jnp.where(hit, s, _random_unlabeled(state, u[DRAW_BLOCK]))
    return _label(state._replace(z_sum=state.z_sum + z, z_sq=state.z_sq + zz,
                                 n_draws=state.n_draws + m.astype(jnp.float32)), s)


def search_epsilon_greedy(state: State, pool: Pool, c, settings: Settings, u, key=None) -> State:
    """One label: a uniformly random unlabelled point with probability epsilon (its class feeds the
    frequency bounds), else the unlabelled point nearest class c's exemplar. u: two uniforms."""
    explore = u[0] < settings.epsilon
    s = jnp.where(explore, _random_unlabeled(state, u[1]), _best_unlabeled(state, -pool.d[c], u[1]))
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
    k_order, k_u, k_keys = jax.random.split(key, 3)
    order = jnp.argsort(jax.random.uniform(k_order, (c,)))  # the classes in random order
    u = jax.random.uniform(k_u, (c, quota, DRAW_BLOCK + 1))
    keys = jax.random.split(k_keys, c * quota).reshape((c, quota) + k_keys.shape)

    def per_class(state, xs):
        cls, u_Q, keys_Q = xs
        active = state.in_search[cls]

        def one(state, xs):
            return _where(active, search(state, pool, cls, settings, *xs), state), None

        state, _ = jax.lax.scan(one, state, (u_Q, keys_Q))
        return _where(active, update_search(state, pool, settings, method), state), None

    state, _ = jax.lax.scan(per_class, state, (order, u, keys))
    return state


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
        logits = jnp.where(free, settings.thompson_scale * uncertainty, _NEG)
        weights = jnp.exp(logits - jnp.max(logits))
    else:  # least confidence (egal, egal_eps and the baseline) or entropy: their maxima, ties at random
        scores = uncertainty if method != "entropy" else \
            -jnp.sum(probs_NxC * jnp.log(jnp.maximum(probs_NxC, 1e-12)), axis=-1)
        scores = jnp.where(free, scores, _NEG)
        weights = scores == jnp.max(scores)
    weights = jnp.where(state.n_labeled == 0, free, weights)
    return _label(state, _pick(weights.astype(jnp.float32), u))


def guided_round(state: State, pool: Pool, settings: Settings) -> State:
    """The oracle baseline: batch // C labels of each class (from the true labels, in random class
    order; a class with no unlabelled point left gives random ones); the rest random."""
    c = pool.p.shape[0]
    quota = settings.batch // c
    state, key = _split(state)
    k_order, k_u = jax.random.split(key)

    def per_class(state, xs):
        cls, u_Q = xs

        def one(state, u):
            return _label(state, _random_unlabeled(state, u, within=pool.y == cls)), None

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
        return _where(state.n_labeled < start + settings.batch, al_label(state, pool, probs, settings, method, u),
                      state), None

    state, key = _split(state)
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

    def step(state, round_index):
        return round_step(state, pool, settings, method, round_index)

    state, metrics = jax.lax.scan(step, state, jnp.arange(settings.rounds))
    return metrics, labels_to_find_common(state, pool)


SEED_BATCH = 25  # seeds vectorised together: their fits' working set stays in the CPU's cache


@functools.partial(jax.jit, static_argnums=(1, 2))
def run_seeds(pool: Pool, settings: Settings, method: str, keys):
    """Every seed of one method in one jitted program (vmapped in groups of SEED_BATCH, the groups in
    a loop: 100 seeds in one vmap ran 3x slower per seed than 25, their working set out of cache):
    metrics [seeds, rounds], labels_to_find [seeds]."""
    return jax.lax.map(functools.partial(run, pool, settings, method), keys, batch_size=SEED_BATCH)
