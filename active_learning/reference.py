"""EGAL one seed at a time in numpy + scikit-learn, the way the authors' code runs it (a Python loop
over draws and labels, `LogisticRegression` refitted each round): the same algorithm as
`strategies.run(..., "egal", key)`, with numpy's random numbers. benchmarks/egal.py times 100 seeds of
it against one vmapped, jitted `strategies.run_seeds`; tests compare their statistics."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression

from active_learning.strategies import Settings


def _bernstein(z_sum, z_sq, n, delta):
    n = max(n, 2.0)
    mean = z_sum / n
    var = np.maximum(z_sq - n * mean**2, 0.0) / (n - 1)
    eps = np.sqrt(2 * var * np.log(2 / delta) / n) + 7 * np.log(2 / delta) / (3 * (n - 1))
    return mean - eps, mean + eps


def run_egal(x, y, x_test, y_test, p, max_weight: float, settings: Settings, seed: int) -> dict:
    """One labelling run: {"accuracy": [rounds], "labels": [rounds], "labels_to_find_common"}."""
    rng = np.random.default_rng(seed)
    n, c = x.shape[0], p.shape[0]
    common = np.bincount(y, minlength=c) / n > settings.threshold
    labeled = np.zeros(n, bool)
    order: list[int] = []
    in_search = np.ones(c, bool)
    z_sum, z_sq, draws = np.zeros(c), np.zeros(c), 0.0
    model = None
    accuracy, labels = [], []

    def label(s):
        labeled[s] = True
        order.append(int(s))

    for _ in range(settings.rounds):
        start = len(order)
        quota = settings.batch // c
        for cls in rng.permutation(c):
            if not in_search[cls]:
                continue
            for _ in range(quota):
                got = False
                for _ in range(settings.max_draws):
                    s = rng.choice(n, p=p[cls])
                    w = (y[s] == np.arange(c)) / (n * p[cls, s]) / max_weight
                    z_sum, z_sq, draws = z_sum + w, z_sq + w * w, draws + 1
                    if not labeled[s]:
                        label(s)
                        got = True
                        break
                if not got:
                    label(rng.choice(np.flatnonzero(~labeled)))
            lo, hi = _bernstein(z_sum, z_sq, draws, 1.0 / max(draws, 2.0))
            lo, hi = lo * max_weight, hi * max_weight
            found = np.bincount(y[labeled], minlength=c) > 0
            resolved = (draws >= 2) & ((lo > settings.threshold) | (hi < settings.threshold))
            in_search &= ~resolved & ~found
        while len(order) < start + settings.batch:
            free = np.flatnonzero(~labeled)
            if model is None:
                label(rng.choice(free))
                continue
            probs = model.predict_proba(x[free])
            full = np.zeros((len(free), c))
            full[:, model.classes_] = probs
            label(free[np.argmax(1 - full.max(1))])
        seen = np.unique(y[labeled])
        if len(seen) > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = LogisticRegression(max_iter=settings.fit_steps * 5).fit(x[labeled], y[labeled])
            pred = model.predict(x_test)
        else:
            pred = np.full(len(y_test), seen[0])
        accuracy.append(float((pred == y_test).mean()))
        labels.append(len(order))
    first = {}
    for i, s in enumerate(order):
        first.setdefault(int(y[s]), i)
    need = [first.get(k, len(order)) for k in np.flatnonzero(common)]
    return {"accuracy": accuracy, "labels": labels, "labels_to_find_common": (max(need) if need else 0) + 1}
