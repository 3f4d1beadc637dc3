"""Exemplar-guided active learning: the frequency estimate and its bounds, the stopping rule, the
search against the baselines on a pool with a rare class, the classifier against scikit-learn,
determinism, each defect of the authors' code, and the bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from active_learning import PoolError, Settings, gaussian_blobs, logistic, make_pool, run_seeds
from active_learning.bounds import bernstein, kl_bounds
from active_learning.search import search_epsilon_greedy, search_round, update_search
from active_learning.state import init_state
from active_learning.strategies import al_label

SETTINGS = Settings(batch=10, rounds=6)


@pytest.fixture(scope="module")
def skewed():
    """A 1% class beside two common ones (threshold 0.1) and a 2% one."""
    x, y, ex, xt, yt = gaussian_blobs([0.85, 0.12, 0.02, 0.01], 1500, dim=8, separation=3.0, seed=0)
    return (x, y, ex, xt, yt), make_pool(x, y, ex, xt, yt, SETTINGS)


def test_importance_weights_estimate_every_class_frequency_without_bias(skewed):
    """Draws from each class's proposal, weighted 1[y = t] / (N p(x)), average to the pool's
    frequency of every class t (simulation over many draws, to 4 standard errors)."""
    (x, y, *_), pool = skewed
    p = np.asarray(pool.p, np.float64)
    n = len(y)
    freq = np.bincount(y) / n
    rng = np.random.default_rng(0)
    for c in range(p.shape[0]):
        s = rng.choice(n, 200_000, p=p[c] / p[c].sum())
        w = (y[s][:, None] == np.arange(4)) / (n * p[c][s])[:, None]
        se = w.std(0) / np.sqrt(len(s))
        assert np.all(np.abs(w.mean(0) - freq) <= 4 * se + 1e-9), (c, w.mean(0), freq, se)
    assert float(pool.max_weight) <= 1 / 0.1 + 1e-3  # the defensive mixture caps every weight


def test_the_search_draws_follow_the_proposal(skewed):
    """The search's inverse-CDF draws land on each pool point with the proposal's probability
    (200,000 draws; every point's count within 5 standard errors, and the pooled chi-square small)."""
    from active_learning.draws import draw

    _, pool = skewed
    p = np.asarray(pool.p[2], np.float64)
    n_draws = 200_000
    s = np.asarray(draw(jnp.cumsum(pool.p[2]), jax.random.uniform(jax.random.PRNGKey(5), (n_draws,))))
    counts = np.bincount(s, minlength=len(p))
    expected = n_draws * p
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected * (1 - p)) + 1)
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < len(p) + 6 * np.sqrt(2 * len(p)), chi2  # mean N - 1, sd sqrt(2 (N - 1))



def test_two_level_draw_is_searchsorted_and_skips_zero_weights():
    """draw() (block ends, then within a block) returns what a binary search returns, on the CDFs the pool
    (padded) and `kernels.cumsum` (both implementations) hand it, lengths around the block, zero-weight runs
    (labelled points) included, and never an index whose weight is 0 or one in the padding (u = 0 and the
    largest u below 1 too)."""
    from active_learning.draws import CDF_BLOCK, draw
    from kernels.cumsum import cumsum

    rng = np.random.default_rng(0)
    for n in (1, 5, CDF_BLOCK - 1, CDF_BLOCK, CDF_BLOCK + 1, 297, 1000):
        w = rng.random(n) * (rng.random(n) < 0.3)
        w[rng.integers(n)] = 1.0
        w[-1] = 0.0 if n > 1 else 1.0
        u = jnp.asarray(np.r_[rng.random(2000), 0.0, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)
        cdf = cumsum(jnp.asarray(w, jnp.float32), impl="matmul")
        np.testing.assert_allclose(cdf, cumsum(jnp.asarray(w, jnp.float32), impl="xla"), rtol=1e-6, atol=1e-6)
        padded = jnp.pad(cdf, (0, -n % CDF_BLOCK), mode="edge")  # as the pool keeps them
        for c in (cdf, padded):
            got = np.asarray(draw(c, u))
            v = jnp.minimum(u * c[-1], jnp.nextafter(c[-1], 0.0))
            np.testing.assert_array_equal(got, np.asarray(jnp.searchsorted(c, v, side="right")))
            assert got.max() < n and np.all(w[got] > 0), n


def test_bernstein_bounds_cover_the_mean_at_least_1_minus_delta():
    """Bounded draws (importance weights / their maximum): the true mean falls outside the bounds in
    at most delta of 2,000 repetitions (to 3 binomial standard errors); so a common class is dropped
    as rare (upper bound below the threshold) at most delta of the time."""
    rng = np.random.default_rng(1)
    delta, n, true = 0.1, 200, 0.15
    misses = 0
    for _ in range(2000):
        z = (rng.random(n) < true) * rng.uniform(0.3, 1.0, n)  # values in [0, 1]
        mean = true * 0.65
        lo, hi = bernstein(jnp.asarray(z.sum()), jnp.asarray((z * z).sum()), jnp.asarray(float(n)), delta)
        misses += not (float(lo) <= mean <= float(hi))
    assert misses / 2000 <= delta + 3 * np.sqrt(delta * (1 - delta) / 2000)
    # the KL bounds sit where n KL(mean || p) = log(1 / delta), on both sides
    lo, hi = kl_bounds(jnp.asarray([0.2, 0.0]), jnp.asarray([100.0, 100.0]), 0.01)

    def kl(p, q):
        return sum(a * np.log(a / b) for a, b in ((p, q), (1 - p, 1 - q)) if a > 0)

    radius = np.log(100) / 100
    assert float(lo[0]) < 0.2 < float(hi[0]) and float(lo[1]) == 0.0 < float(hi[1])
    for mean, bound in ((0.2, lo[0]), (0.2, hi[0]), (0.0, hi[1])):
        assert abs(kl(mean, float(bound)) - radius) < 1e-4, (mean, float(bound))


def test_egal_finds_every_common_class_sooner_than_random_and_least_confidence(skewed):
    _, pool = skewed
    keys = jax.random.split(jax.random.PRNGKey(0), 48)
    found = {m: float(np.mean(run_seeds(pool, SETTINGS, m, keys)[1])) for m in ("egal", "random", "least_confidence")}
    assert found["egal"] < found["random"] and found["egal"] < found["least_confidence"], found


def test_the_bernstein_bound_has_its_hand_computed_value():
    """n = 100 draws, sum 10, sum of squares 5, delta = 0.01: mean 0.1, sample variance (5 - 100 x 0.01) / 99
    = 0.040404, log(2 / delta) = 5.298317; eps = sqrt(2 x 0.040404 x 5.298317 / 100) + 7 x 5.298317 / (3 x 99)
    = 0.065434 + 0.124876 = 0.190309."""
    lo, hi = bernstein(jnp.asarray(10.0), jnp.asarray(5.0), jnp.asarray(100.0), 0.01)
    np.testing.assert_allclose([float(lo), float(hi)], [0.1 - 0.190309, 0.1 + 0.190309], atol=2e-6)


def absent_class_pool(settings, absent: int):
    """Two separated blobs (70% / 30%) and `absent` classes with an exemplar and no pool or test point; the
    proposal's weights capped at 2 (uniform_mix 0.5)."""
    x, y, ex, xt, yt = gaussian_blobs([0.7, 0.3], 1000, dim=8, separation=5.0, seed=4)
    exemplars = np.concatenate([ex, ex.mean(0, keepdims=True) + 3.0 * np.eye(8)[:absent]])  # off to the sides
    return make_pool(x, y, exemplars, xt, yt, settings, ess_target=0.6, uniform_mix=0.5)


def test_an_absent_class_leaves_the_search_proven_rare_at_the_draws_the_bound_needs():
    """No hit in n draws: the upper bound is max_weight x 7 log(2n) / (3 (n - 1)) (delta = 1 / n), below the
    threshold 0.1 at max_weight 2 first for n = 300 (hand count). At 299 draws every class stays in the
    search, at 300 each leaves; egal_nostop keeps them."""
    settings = Settings(batch=30, rounds=12, threshold=0.1)
    pool = absent_class_pool(settings, 1)._replace(max_weight=jnp.asarray(2.0))
    state = init_state(pool, settings, jax.random.PRNGKey(0))
    for n, method, left in ((299.0, "egal", False), (300.0, "egal", True), (300.0, "egal_nostop", False)):
        after = update_search(state._replace(n_draws=jnp.asarray(n)), pool, settings, method)
        assert bool(np.all(~np.asarray(after.in_search))) == left and bool(np.any(after.in_search)) != left, (n, method)


def test_the_stopping_rule_proves_absent_classes_rare_within_the_budget():
    """End to end (fails if the rule is deleted): three classes with no member leave the search proven rare
    in most seeds, and the search ends; without the rule (egal_nostop) they are searched for to the last
    round. (Their draws add up: 3 x 50 // 5 search labels a round, ~300 needed.)"""
    settings = Settings(batch=50, rounds=10, threshold=0.1)
    pool = absent_class_pool(settings, 3)
    assert float(pool.max_weight) <= 2.0 + 1e-3
    keys = jax.random.split(jax.random.PRNGKey(1), 16)
    with_rule, _ = run_seeds(pool, settings, "egal", keys)
    without, _ = run_seeds(pool, settings, "egal_nostop", keys)
    proven = np.asarray(with_rule["proven_rare"])[:, -1]
    assert (proven == 3).mean() >= 0.75 and (np.asarray(with_rule["in_search"])[proven == 3, -1] == 0).all(), proven
    assert (np.asarray(without["proven_rare"]) == 0).all() and (np.asarray(without["in_search"])[:, -1] == 3).all()


def test_logistic_regression_matches_scikit_learn():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    w = np.zeros(len(x), np.float32)
    w[np.random.RandomState(0).permutation(len(x))[:200]] = 1
    ours = logistic.fit(logistic.init(64, 10), jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), steps=100)
    theirs = LogisticRegression(max_iter=5000, tol=1e-8).fit(x[w > 0], y[w > 0])
    agree = (np.asarray(logistic.predict_proba(ours, jnp.asarray(x))).argmax(1) == theirs.predict(x)).mean()
    assert agree >= 0.995, agree
    sk = logistic.Logistic(jnp.asarray(theirs.coef_.T, jnp.float32), jnp.asarray(theirs.intercept_, jnp.float32))
    ref = float(logistic.objective(sk, jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))
    assert abs(float(logistic.objective(ours, jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))) - ref) <= 1e-4 * ref


def test_a_tolerance_stopped_fit_is_scikit_learns_and_ignores_its_batch_mates():
    """With scikit-learn's default tol (1e-4, the same stopping rule) the fit predicts as scikit-learn's
    default fit does; vmapped beside fits that need more steps, a fit that stopped
    keeps its parameters: its result is the one it gets beside copies of itself."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    r = np.random.RandomState(0)
    idx = np.stack([r.permutation(len(x))[:n] for n in (200, 200, 200)])
    w = np.ones(idx.shape, np.float32)
    w[1, 40:] = 0  # a fit on 40 points beside two on 200
    xs, ys, ws = jnp.asarray(x[idx]), jnp.asarray(y[idx]), jnp.asarray(w)
    fit = lambda x, y, w: logistic.fit(logistic.init(64, 10), x, y, w, steps=200, tol=1e-4)  # noqa: E731
    batched = jax.jit(jax.vmap(fit))
    together = batched(xs, ys, ws)
    for i in range(3):
        copies = [jnp.stack([a[i]] * 3) for a in (xs, ys, ws)]  # the same compiled program, other batch mates
        alone = jax.tree.map(lambda a: a[0], batched(*copies))
        np.testing.assert_allclose(np.asarray(together.W[i]), np.asarray(alone.W), rtol=1e-6, atol=1e-7)
        keep = w[i] > 0
        theirs = LogisticRegression().fit(x[idx[i]][keep], y[idx[i]][keep])
        ours = np.asarray(logistic.predict_proba(alone, jnp.asarray(x))).argmax(1)
        assert (ours == theirs.predict(x)).mean() >= 0.99


def test_runs_are_deterministic_for_a_seed(skewed):
    _, pool = skewed
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    a, b = run_seeds(pool, SETTINGS, "egal", keys), run_seeds(pool, SETTINGS, "egal", keys)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# --- the defects of the authors' code, one test each ----------------------------------------------------------
def test_a_flat_model_picks_uniformly_not_the_lowest_index(skewed):
    """Before two classes are labelled the classifier is flat and every uncertainty ties: least
    confidence and entropy must then pick at random over the whole pool (pools are often sorted by
    class; a lowest-index pick never leaves the first class)."""
    (_, y, *_), pool = skewed
    state = init_state(pool, SETTINGS, jax.random.PRNGKey(0))
    flat = jnp.full((len(y), pool.p.shape[0]), 1.0 / pool.p.shape[0])
    state = state._replace(n_labeled=jnp.asarray(1, jnp.int32))  # past the first (random) label
    pick = jax.jit(jax.vmap(lambda u: al_label(state, pool, flat, SETTINGS, "least_confidence", u).order[1]))
    picks = np.asarray(pick(jax.random.uniform(jax.random.PRNGKey(4), (200,))))
    assert len(set(picks.tolist())) > 150  # 200 draws over 1500 points: nearly all distinct
    assert abs(np.median(picks) - len(y) / 2) < 0.15 * len(y)


def test_greedy_search_takes_the_nearest_unlabelled_point_not_the_farthest(skewed):
    (x, *_), pool = skewed
    state = init_state(pool, Settings(epsilon=0.0), jax.random.PRNGKey(0))
    state = search_epsilon_greedy(state, pool, 1, Settings(epsilon=0.0), jnp.asarray([0.5, 0.5]))
    chosen = int(state.order[0])
    assert chosen == int(np.argmin(np.asarray(pool.d[1])))


def test_thompson_selection_picks_unlabelled_points_by_their_own_index(skewed):
    _, pool = skewed
    n = pool.x.shape[0]
    state = init_state(pool, SETTINGS, jax.random.PRNGKey(0))
    labeled = np.ones(n, bool)
    labeled[[7, 900]] = False  # two unlabelled points; the model is sure of 7 and unsure of 900
    probs = np.tile([0.999, 0.001 / 3, 0.001 / 3, 0.001 / 3], (n, 1)).astype(np.float32)
    probs[900] = [0.25, 0.25, 0.25, 0.25]
    state = state._replace(labeled=jnp.asarray(labeled), n_labeled=jnp.asarray(n - 2, jnp.int32),
                           order=jnp.zeros((n,), jnp.int32))
    pick = jax.vmap(lambda u: al_label(state, pool, jnp.asarray(probs), Settings(thompson_scale=10.0), "egal_thompson",
                                       u).order[n - 2])
    picks = np.asarray(pick(jax.random.uniform(jax.random.PRNGKey(1), (40,)))).tolist()
    assert set(picks) <= {7, 900} and picks.count(900) > 30, picks


def test_the_search_goes_on_while_a_single_class_is_unresolved(skewed):
    _, pool = skewed
    state = init_state(pool, SETTINGS, jax.random.PRNGKey(0))
    state = state._replace(in_search=jnp.asarray([False, False, False, True]))  # one class left
    after = search_round(state, pool, SETTINGS, "egal")
    assert int(after.n_labeled) == SETTINGS.batch // 4 and float(after.n_draws) > 0


def test_importance_values_are_normalised_into_the_unit_interval(skewed):
    _, pool = skewed
    state = init_state(pool, SETTINGS, jax.random.PRNGKey(2))
    for _ in range(3):
        state = search_round(state, pool, SETTINGS, "egal")
    z_sum, z_sq, n = (np.asarray(a, np.float64) for a in (state.z_sum, state.z_sq, state.n_draws))
    assert n > 0 and np.all(z_sum <= n + 1e-6) and np.all(z_sq <= z_sum + 1e-6)  # each value in [0, 1]
    assert np.isclose(float(pool.max_weight), 1 / (pool.x.shape[0] * float(jnp.min(pool.p))), rtol=1e-5)


def test_the_dictionary_exemplars_are_the_search_centres(skewed):
    """The proposal peaks at the pool point nearest the given exemplar, and no pool point is removed
    or substituted for it (the authors' code replaced exemplars with random pool examples)."""
    (x, y, ex, xt, yt), pool = skewed
    assert pool.x.shape[0] == len(x)
    for c in range(len(ex)):
        nearest = np.argmin(((x - ex[c]) ** 2).sum(1))
        assert int(np.argmax(np.asarray(pool.p[c]))) == nearest


def test_bad_inputs_are_named():
    x, y, ex, xt, yt = gaussian_blobs([0.9, 0.1], 100, seed=1)
    with pytest.raises(PoolError, match="budget"):
        make_pool(x, y, ex, xt, yt, Settings(batch=20, rounds=10))
    with pytest.raises(PoolError, match=r"1 exemplars .*labels \[1\] have none"):
        make_pool(x, y, ex[:1], xt, yt, SETTINGS)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(PoolError, match="NaN"):
        make_pool(bad, y, ex, xt, yt, SETTINGS)
    with pytest.raises(PoolError, match="threshold"):
        make_pool(x, y, ex, xt, yt, Settings(batch=10, rounds=2, threshold=1.5))
    with pytest.raises(PoolError, match="fit_tol"):
        make_pool(x, y, ex, xt, yt, Settings(batch=10, rounds=2, fit_tol=-1.0))


def test_the_runner_writes_results_and_plots_for_every_method_and_pool(tmp_path, monkeypatch):
    """configs/egal_wsd.py end to end at a small size: a pseudo-word pool embedded by a tiny Jamba and
    the digits, results.json in the documented shape, one PNG per pool; a pool's compiled programs are
    released before the next (XLA:CPU's ~1000 memory maps per program ran the full run out of maps)."""
    import json
    import os

    from test_training import small_config

    import tasks
    from configs import egal_wsd

    lm = str(tmp_path / "lm")
    tasks.run(small_config(num_train_steps=4, eval_every_steps=4, save_every_steps=4), lm)
    c = egal_wsd.get_config()
    c.encoder, c.encoder_checkpoint, c.encoder_layer, c.num_seeds = "jamba", lm, 1, 3
    c.pools, c.skews, c.methods = ("personmusic",), (4,), ("egal", "random")
    c.al.rounds, c.al.batch = 3, 10
    c.min_all_labels_accuracy = 0.0  # a 4-step Jamba's features separate nothing; run every pool anyway
    workdir = str(tmp_path / "egal")
    from tasks import egal_wsd as runner

    programs_held, run_pool = [], runner.run_pool

    def counting_run_pool(*args):
        programs_held.append(run_seeds._cache_size())  # compiled programs alive as a pool starts
        return run_pool(*args)

    monkeypatch.setattr(runner, "run_pool", counting_run_pool)
    tasks.run(c, workdir)
    assert len(programs_held) == 2 and programs_held[1] == 0 and run_seeds._cache_size() == 0
    results = json.load(open(os.path.join(workdir, "results.json")))
    names = {"personmusic 1:4, 2 absent", "digits 0-4, 5 absent"}
    assert set(results["pools"]) == names and results["encoder"].startswith("jamba")
    for pool in results["pools"].values():
        assert set(pool["methods"]) == {"egal", "random"} and 0.0 <= pool["all_labels_accuracy"] <= 1.0
        assert pool["frequencies"][-2:] == [0.0, 0.0] and pool["common"][-2:] == [False, False]
        r = pool["methods"]["egal"]
        assert r["labels"] == [10, 20, 30] and len(r["accuracy"]) == len(r["macro_f1_ci"]) == len(r["proven_rare"]) == 3
        assert 1 <= r["labels_to_find_common"] <= 31 and 10 <= r["labels_to_reach_90"] <= 30
    seeds = json.load(open(os.path.join(workdir, "seeds.json")))
    assert set(seeds["pools"]) == names
    assert all(len(v) == 3 for p in seeds["pools"].values() for m in p.values() for v in m.values())
    assert sorted(f for f in os.listdir(workdir) if f.endswith(".png")) == ["digits_0_4__5_absent.png",
                                                                           "personmusic_1_4__2_absent.png"]


def test_context_vectors_leave_out_the_target_and_place_similar_contexts_together():
    """Schütze's context vectors on a small corpus: words that share neighbours get close vectors, a
    context's vector ignores the target span, and sentences about the same topic are nearer each other."""
    from active_learning.context_vectors import context_encoder

    water = ["the river water flows over the stone bank", "a boat on the river water near the bank",
             "fish swim in the cold river water"]
    kin = ["the family of a mother and her son", "a son and a daughter in the family home",
           "the mother of the family told her son"]
    embed, description = context_encoder((water + kin) * 20, dim=4, window=3, min_count=2)
    texts = ["boats float on XXXX water", "the XXXX mother and son", "cold XXXX water and fish", "a daughter XXXX"]
    spans = [(t.index("XXXX"), t.index("XXXX") + 4) for t in texts]
    v = embed(texts, spans)
    assert v.shape == (4, 4) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[2] > v[0] @ v[1] and v[1] @ v[3] > v[1] @ v[2], v @ v.T
    same = embed(["boats float on river water"], [(15, 20)])  # a different word in the target span
    np.testing.assert_allclose(same[0], v[0], atol=1e-6)
    assert "Schütze" in description
