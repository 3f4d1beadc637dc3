"""Exemplar-guided active learning (issue 15): the figures of BENCHMARKS.md from a runner's results, and
the wall time of 100 seeds of one pool as one vmapped, jitted program vs the same algorithm run seed by
seed in numpy + scikit-learn (active_learning/reference.py), measured in the same process.

  python main.py --config=configs/egal_wsd.py --workdir=workdir_egal        # the runner, first
  python -m benchmarks.egal --results workdir_egal/results.json [--timing-seeds 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def labels_to_reach(result: dict, fraction: float = 0.9) -> float:
    """Labels at which accuracy on the common classes first reaches `fraction` of its final value."""
    acc, labels = np.asarray(result["common_accuracy"]), np.asarray(result["labels"])
    hit = np.flatnonzero(acc >= fraction * acc[-1])
    return float(labels[hit[0]]) if len(hit) else float("nan")


def timing(seeds: int, repeats: int = 3) -> dict:
    """100 seeds of EGAL on the skewed digits pool: jitted + vmapped (cold: the first call, with
    compilation; warm: the median of `repeats` further calls, each with new seeds) vs numpy +
    scikit-learn one seed at a time."""
    import jax

    from active_learning import make_pool, run_seeds
    from active_learning.reference import run_egal
    from active_learning.strategies import SEED_BATCH
    from configs import egal_wsd
    from tasks.egal_wsd import digits_pool, settings_of

    config = egal_wsd.get_config()
    settings = settings_of(config)
    _, x, y, exemplars, x_test, y_test = digits_pool(config)
    a = config.al
    pool = make_pool(x, y, exemplars, x_test, y_test, settings, a.ess_target, a.uniform_mix, a.min_prob)
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    start = time.perf_counter()
    jax.block_until_ready(run_seeds(pool, settings, "egal", keys))
    cold = time.perf_counter() - start
    warm = []
    for r in range(repeats):
        start = time.perf_counter()
        metrics, _ = jax.block_until_ready(run_seeds(pool, settings, "egal",
                                                     jax.random.split(jax.random.PRNGKey(1 + r), seeds)))
        warm.append(time.perf_counter() - start)
    p = np.asarray(pool.p, np.float64)
    p = p / p.sum(1, keepdims=True)
    start = time.perf_counter()
    ref = [run_egal(x, y, x_test, y_test, p, float(pool.max_weight), settings, s) for s in range(seeds)]
    numpy_s = time.perf_counter() - start
    return {"seeds": seeds, "points": int(len(y)), "classes": int(p.shape[0]), "jax_cold_s": cold,
            "jax_warm_s": float(np.median(warm)), "jax_warm_all_s": warm, "seed_batch": SEED_BATCH,
            "numpy_sklearn_s": numpy_s,
            "final_accuracy_jax": float(np.asarray(metrics["accuracy"])[:, -1].mean()),
            "final_accuracy_numpy": float(np.mean([r["accuracy"][-1] for r in ref]))}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default=os.path.join(ROOT, "workdir_egal", "results.json"))
    parser.add_argument("--timing-seeds", type=int, default=100)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    t = timing(args.timing_seeds)
    from benchmarks.common import machine, write_section

    baselines = ("random", "least_confidence", "entropy", "guided")
    rows = []
    for name, pool in results["pools"].items():
        m = pool["methods"]
        reach = {k: labels_to_reach(v) for k, v in m.items()}
        rows.append(f"| {name} | {pool['size']} | {reach['egal']:.0f} | "
                    + " | ".join(f"{reach[b]:.0f}" for b in baselines)
                    + f" | {m['egal']['labels_to_find_common']:.1f} / {m['random']['labels_to_find_common']:.1f} / "
                    f"{m['least_confidence']['labels_to_find_common']:.1f} | {m['egal']['rare_labels'][-1]:.1f} / "
                    f"{m['random']['rare_labels'][-1]:.1f} / {m['least_confidence']['rare_labels'][-1]:.1f} | "
                    f"{m['egal']['accuracy'][-1]:.3f} / {m['random']['accuracy'][-1]:.3f} / "
                    f"{m['least_confidence']['accuracy'][-1]:.3f} |")
    first = next(iter(results["pools"]))
    slug = "".join(ch if ch.isalnum() else "_" for ch in first)
    src = os.path.join(os.path.dirname(os.path.abspath(args.results)), f"{slug}.png")
    figure = os.path.join(ROOT, "benchmarks", "figures", "egal.png")
    if os.path.exists(src):
        os.makedirs(os.path.dirname(figure), exist_ok=True)
        shutil.copyfile(src, figure)
    s = results["settings"]
    body = f"""## Exemplar-guided active learning (issue 15)

Commands: `python main.py --config=configs/egal_wsd.py --workdir=workdir_egal` (the runner: every method x
{results['num_seeds']} seeds x pool; embeddings: {results['encoder'] or 'none'}), then
`python -m benchmarks.egal --results workdir_egal/results.json`. Machine: {machine()}. Batches of
{s['batch']} labels, {s['rounds']} rounds, multinomial logistic regression refitted each round, frequency
threshold {s['threshold']}; pseudo-word pools draw the rare sense at 1:100 and 1:10 of the common one,
balanced test sets; digits keep class c at 0.5^c. Means over seeds.

| pool | points | labels to 90% of final common-class accuracy: egal | random | least conf. | entropy | guided (oracle) | labels to find every common class: egal / random / LC | rare labels spent: egal / random / LC | final accuracy (balanced): egal / random / LC |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |
{chr(10).join(rows)}

![egal]({os.path.relpath(figure, ROOT)})

Wall time, {t['seeds']} seeds of EGAL on the digits pool ({t['points']} points, {t['classes']} classes), same
process: one jitted program (seeds vmapped in groups of {t['seed_batch']}) {t['jax_warm_s']:.2f} s (median of
{len(t['jax_warm_all_s'])} calls: {', '.join(f'{w:.2f}' for w in t['jax_warm_all_s'])}; {t['jax_cold_s']:.1f} s the first, with compilation) vs
numpy + scikit-learn seed by seed {t['numpy_sklearn_s']:.1f} s: {t['numpy_sklearn_s'] / t['jax_warm_s']:.1f}x
({t['numpy_sklearn_s'] / t['jax_cold_s']:.1f}x counting compilation). Final accuracy, mean over the seeds:
{t['final_accuracy_jax']:.3f} (JAX) vs {t['final_accuracy_numpy']:.3f} (numpy + scikit-learn).
"""
    print(body)
    if not args.no_write:
        write_section("egal", body)


if __name__ == "__main__":
    main()
