"""EGAL one seed at a time in numpy + scikit-learn, the way the authors' code runs it (a Python loop
over draws and labels, `LogisticRegression` refitted each round): the same algorithm as
`strategies.run(..., "egal", key)`, with numpy's random numbers. benchmarks/egal.py times 100 seeds of
it against one vmapped, jitted `strategies.run_seeds`; tests compare their statistics."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression

from active_learning.state import Settings


def _bernstein(z_sum, z_sq, n, delta):
    n = max(n, 2.0)
    mean = z_sum / n
    var = np.maximum(z_sq - n * mean**2, 0.0) / (n - 1)
    eps = np.sqrt(2 * var * np.log(2 / delta) / n) + 7 * np.log(2 / delta) / (3 * (n - 1))
    return mean - eps, mean + eps


class _Run:
    """One seed's labelling state, updated as the authors' loop updates it."""

    def __init__(self, y, p, max_weight: float, settings: Settings, rng):
        self.y, self.p, self.max_weight, self.settings, self.rng = y, p, max_weight, settings, rng
        n, c = len(y), p.shape[0]
        self.labeled, self.order, self.in_search = np.zeros(n, bool), [], np.ones(c, bool)
        self.z_sum, self.z_sq, self.draws = np.zeros(c), np.zeros(c), 0.0

    def label(self, s):
        self.labeled[s] = True
        self.order.append(int(s))

    def search_label(self, cls):
        """Draws from class cls's proposal until an unlabelled point (every draw updating the statistics)."""
        n, c = self.p.shape[1], self.p.shape[0]
        for _ in range(self.settings.max_draws):
            s = self.rng.choice(n, p=self.p[cls])
            w = (self.y[s] == np.arange(c)) / (n * self.p[cls, s]) / self.max_weight
            self.z_sum, self.z_sq, self.draws = self.z_sum + w, self.z_sq + w * w, self.draws + 1
            if not self.labeled[s]:
                return self.label(s)
        self.label(self.rng.choice(np.flatnonzero(~self.labeled)))

    def update_search(self):
        lo, hi = _bernstein(self.z_sum, self.z_sq, self.draws, 1.0 / max(self.draws, 2.0))
        lo, hi = lo * self.max_weight, hi * self.max_weight
        found = np.bincount(self.y[self.labeled], minlength=self.p.shape[0]) > 0
        resolved = (self.draws >= 2) & ((lo > self.settings.threshold) | (hi < self.settings.threshold))
        self.in_search &= ~resolved & ~found

    def least_confidence(self, x, model, until: int):
        """Labels the least confident unlabelled points (random ones before any model) until `until` labels."""
        while len(self.order) < until:
            free = np.flatnonzero(~self.labeled)
            if model is None:
                self.label(self.rng.choice(free))
                continue
            full = np.zeros((len(free), self.p.shape[0]))
            full[:, model.classes_] = model.predict_proba(x[free])
            self.label(free[np.argmax(1 - full.max(1))])


def _refit(x, y, labeled, x_test, settings: Settings):
    """(scikit-learn's model on the labelled points or None while one class is seen, test predictions)."""
    seen = np.unique(y[labeled])
    if len(seen) == 1:
        return None, np.full(len(x_test), seen[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(max_iter=settings.fit_steps * 5).fit(x[labeled], y[labeled])
    return model, model.predict(x_test)


def run_egal(x, y, x_test, y_test, p, max_weight: float, settings: Settings, seed: int) -> dict:
    """One labelling run: {"accuracy": [rounds], "labels": [rounds], "labels_to_find_common"}."""
    rng = np.random.default_rng(seed)
    c = p.shape[0]
    run = _Run(y, p, max_weight, settings, rng)
    model, accuracy, labels = None, [], []
    for _ in range(settings.rounds):
        start = len(run.order)
        for cls in rng.permutation(c):
            if run.in_search[cls]:
                for _ in range(settings.batch // c):
                    run.search_label(cls)
                run.update_search()
        run.least_confidence(x, model, start + settings.batch)
        model, pred = _refit(x, y, run.labeled, x_test, settings)
        accuracy.append(float((pred == y_test).mean()))
        labels.append(len(run.order))
    first = {}
    for i, s in enumerate(run.order):
        first.setdefault(int(y[s]), i)
    common = np.bincount(y, minlength=c) / len(y) > settings.threshold
    need = [first.get(k, len(run.order)) for k in np.flatnonzero(common)]
    return {"accuracy": accuracy, "labels": labels, "labels_to_find_common": (max(need) if need else 0) + 1}
