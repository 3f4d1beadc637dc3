"""Exemplar-guided active learning for word senses with rare classes, every method x seed x pool:

  python main.py --config=configs/egal_wsd.py --workdir=DIR [--config.num_seeds=N]

Pools: the pseudo-words of data/egal_pools (built by `python -m data.build_egal_pools`), each drawn at
every skew of `config.skews` (common : second sense), with `config.absent_senses` senses of another
pseudo-word as classes that have a gloss and no example (senses the text never uses), a balanced test
set of the senses present and the WordNet gloss of each sense as its exemplar; and scikit-learn's
digits 0-4 with 5-9 absent (one held-out image of each digit as its exemplar). Words in context are
embedded by `config.encoder`: Schütze's context vectors over the bundled corpus
(`active_learning.context_vectors`), a Jamba checkpoint's hidden states at `config.encoder_layer`
(`jamba_jax.features`) or a sensebert_pretrain workdir's encoder (`sensebert_jax.encoder`); the
results say which.

Writes DIR/results.json (per pool: its size, class frequencies, the accuracy of the classifier fitted
on every pool label; per method: mean curves against labels with 95% intervals over seeds, and the
per-run figures' means and intervals), DIR/seeds.json (every seed's figures) and a PNG per pool.
"""

from __future__ import annotations

import gzip
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from active_learning import METHODS, PoolError, Settings, logistic, make_pool, run_seeds
from active_learning.context_vectors import context_encoder
from active_learning.strategies import SEARCH_METHODS
from jamba_jax.features import EncoderLayerError, jamba_encoder
from sensebert_jax.encoder import sensebert_encoder
from training.data import text_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLS_FILE = os.path.join(ROOT, "data", "egal_pools", "pseudowords.jsonl.gz")


# --- encoders ----------------------------------------------------------------------------------------------
def make_encoder(config):
    """(embed, description) of the encoder the config names (`active_learning.context_vectors`,
    `jamba_jax.features`, `sensebert_jax.encoder`)."""
    if config.encoder == "context":
        return context_encoder(text_source(ml_collections.ConfigDict({"source": "bundled"}), "train"),
                               config.context_dim)
    if config.encoder not in ("jamba", "sensebert"):
        raise PoolError(f"config.encoder={config.encoder!r}; expected 'context', 'jamba' or 'sensebert'")
    if not os.path.isdir(config.encoder_checkpoint):
        raise PoolError(f"config.encoder_checkpoint={config.encoder_checkpoint!r} is not a directory: train one "
                        "first (python main.py for the tiny Jamba; configs/sensebert_tiny.py for SenseBERT)")
    if config.encoder == "jamba":
        try:
            return jamba_encoder(config.encoder_checkpoint, config.encoder_layer)
        except EncoderLayerError as e:
            raise PoolError(f"config.encoder_layer: {e}") from e
    return sensebert_encoder(config.encoder_checkpoint)


# --- pools -----------------------------------------------------------------------------------------------------
def read_pseudowords(names) -> tuple[list[dict], list[dict]]:
    """(the pseudo-words named, every pseudo-word built, in file order)."""
    if not os.path.exists(POOLS_FILE):
        raise PoolError(f"{POOLS_FILE} is missing: run python -m data.build_egal_pools")
    with gzip.open(POOLS_FILE, "rt", encoding="utf-8") as f:
        built = list(map(json.loads, f))
    pools = {p["name"]: p for p in built}
    unknown = sorted(set(names) - set(pools))
    if unknown:
        raise PoolError(f"config.pools names {unknown}; the pseudo-words built are {sorted(pools)}")
    return [pools[n] for n in names], built


def word_pools(config, embed):
    """(name, x, y, exemplars, x_test, y_test) per pseudo-word and skew. Sense 0 is the common one, sense
    1 kept at 1:skew of it; with config.absent_senses = k, the first k senses of the next pseudo-word
    built are classes too, with their glosses as exemplars and no example in the pool or the test set:
    senses a dictionary lists that the text never uses, which the search has to give up on."""
    chosen, built = read_pseudowords(config.pools)
    if not 0 <= config.absent_senses <= 2 or (config.absent_senses and len(built) < 2):
        raise PoolError(f"config.absent_senses={config.absent_senses}: 0, 1 or 2 (the senses of another of the "
                        f"{len(built)} pseudo-words built)")
    out = []
    for p in chosen:
        partner = built[(built.index(p) + 1) % len(built)]
        absent = partner["exemplars"][:config.absent_senses]
        ex, glosses = p["examples"], p["exemplars"] + absent
        vectors = embed([e["text"] for e in ex] + [e["text"] for e in glosses],
                        [(e["start"], e["end"]) for e in ex] + [(e["start"], e["end"]) for e in glosses])
        x_all, exemplars = vectors[:len(ex)], vectors[len(ex):]
        labels = np.asarray([e["label"] for e in ex])
        test = np.asarray([e["split"] == "test" for e in ex])
        suffix = f", {len(absent)} absent" if absent else ""
        for skew in config.skews:
            rng = np.random.RandomState(config.seed + skew)
            common = np.flatnonzero(~test & (labels == 0))
            rare_all = np.flatnonzero(~test & (labels == 1))
            n_common = len(common)
            n_rare = max(1, min(len(rare_all), n_common // skew))
            kept = np.concatenate([common, rng.choice(rare_all, n_rare, replace=False)])
            out.append((f"{p['name']} 1:{skew}{suffix}", x_all[kept], labels[kept], exemplars, x_all[test],
                        labels[test]))
    return out


def digits_pool(config):
    """scikit-learn's digits 0-4 (every image not held out) with 5-9 as classes that have an exemplar and
    no pool or test image: one held-out image per digit is its exemplar, 30 held-out images per present
    digit the test set."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.RandomState(config.seed)
    perm = rng.permutation(len(y))
    x, y = x[perm], y[perm]
    exemplar_idx = np.asarray([np.flatnonzero(y == c)[0] for c in range(10)])
    test_idx = np.concatenate([np.flatnonzero(y == c)[1:31] for c in range(5)])
    rest = np.setdiff1d(np.arange(len(y)), np.concatenate([exemplar_idx, test_idx, np.flatnonzero(y >= 5)]))
    return ("digits 0-4, 5 absent", x[rest], y[rest], x[exemplar_idx], x[test_idx], y[test_idx])


# --- the runner -------------------------------------------------------------------------------------------------
def settings_of(config) -> Settings:
    a = config.al
    return Settings(batch=a.batch, rounds=a.rounds, threshold=a.threshold, epsilon=a.epsilon,
                    thompson_scale=a.thompson_scale, fit_steps=a.fit_steps, fit_tol=a.fit_tol,
                    max_draws=a.max_draws)


def all_labels_accuracy(pool, settings: Settings) -> float:
    """Balanced test accuracy of the classifier fitted on every pool label: what the features allow at best."""
    weights = jnp.ones(pool.y.shape, jnp.float32)
    model = logistic.fit(logistic.init(pool.x.shape[1], pool.p.shape[0]), pool.x, pool.y, weights, 200,
                         tol=settings.fit_tol)
    pred = np.asarray(jnp.argmax(logistic.logits(model, pool.x_test), -1))
    y = np.asarray(pool.y_test)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def labels_to_reach(accuracy_SxR, labels_R, fraction: float = 0.9):
    """[S]: labels at which each seed's accuracy first reaches `fraction` of its own final value."""
    hit = accuracy_SxR >= fraction * accuracy_SxR[:, -1:]
    return np.asarray(labels_R)[np.argmax(hit, axis=1)].astype(np.float64)


def interval(values_S) -> list[float]:
    """[mean, half-width of its 95% interval] over seeds (normal approximation; 0 for one seed)."""
    v = np.asarray(values_S, np.float64)
    half = 1.96 * v.std(0, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.zeros_like(v.mean(0))
    return [v.mean(0).tolist(), np.asarray(half).tolist()]


CURVES = ("accuracy", "macro_f1", "rare_labels", "proven_rare", "classes_found", "in_search")


def run_pool(name, data, config, settings, methods, bar) -> tuple[dict, dict]:
    """(summary: per method the mean curves with 95% intervals and the per-run figures' means and
    intervals; per-seed: every seed's final figures), or (the pool's summary, None) when a classifier
    fitted on every label is below config.min_all_labels_accuracy: nothing is run on it."""
    x, y, exemplars, x_test, y_test = data
    a = config.al
    pool = make_pool(x, y, exemplars, x_test, y_test, settings, a.ess_target, a.uniform_mix, a.min_prob, name)
    keys = jax.random.split(jax.random.PRNGKey(config.seed), config.num_seeds)
    freq = (np.bincount(y, minlength=len(exemplars)) / len(y)).round(4).tolist()
    result = {"size": int(len(y)), "frequencies": freq, "common": np.asarray(pool.common).tolist(),
              "all_labels_accuracy": all_labels_accuracy(pool, settings), "methods": {}}
    if result["all_labels_accuracy"] < config.min_all_labels_accuracy:  # the features cannot show an effect
        bar.update(len(methods))
        return result, None
    seeds = {}
    for method in methods:
        start = time.perf_counter()
        metrics, to_find = jax.block_until_ready(run_seeds(pool, settings, method, keys))
        metrics = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
        labels = metrics["labels"][0].astype(int).tolist()
        per_seed = {"labels_to_find_common": np.asarray(to_find, np.float64),
                    "labels_to_reach_90": labels_to_reach(metrics["accuracy"], labels),
                    "final_accuracy": metrics["accuracy"][:, -1], "final_macro_f1": metrics["macro_f1"][:, -1],
                    "final_rare_labels": metrics["rare_labels"][:, -1],
                    "final_proven_rare": metrics["proven_rare"][:, -1]}
        r = {"labels": labels, "seconds": time.perf_counter() - start}
        for key in CURVES:
            r[key], r[f"{key}_ci"] = interval(metrics[key])
        for key, v in per_seed.items():
            r[key], r[f"{key}_ci"] = interval(v)
        result["methods"][method] = r
        seeds[method] = {k: v.round(4).tolist() for k, v in per_seed.items()}
        bar.update(1)
        bar.set_postfix(pool=name, method=method)
    return result, seeds


def plot(name: str, result: dict, path: str) -> None:
    """Accuracy, macro F1, classes still in the search and classes proven rare against labels, 95% bands over
    seeds. (Labels spent on present classes below the threshold are left out: these pools have none.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("accuracy", "accuracy (balanced test)"), ("macro_f1", "macro F1"),
              ("in_search", "classes still searched for (search methods)"), ("proven_rare", "classes proven rare"))
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 3.8))
    for method, r in result["methods"].items():
        labels = np.asarray(r["labels"])
        for ax, (key, _) in zip(axes, panels, strict=True):
            if key == "in_search" and method not in SEARCH_METHODS:
                ax.plot([], [])  # keeps each method's colour the same in every panel
                continue
            mean, half = np.asarray(r[key]), np.asarray(r[f"{key}_ci"])
            line, = ax.plot(labels, mean, label=method, lw=2.2 if method == "egal" else 1)
            ax.fill_between(labels, mean - half, mean + half, color=line.get_color(), alpha=0.15)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("labels")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: {result['size']} points, class frequencies {result['frequencies']}; classifier on every "
                 f"label: {result['all_labels_accuracy']:.3f}; 95% intervals over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(config, workdir: str) -> dict:
    settings = settings_of(config)
    methods = tuple(config.methods) or METHODS
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise PoolError(f"config.methods names {unknown}; the methods are {METHODS}")
    if config.num_seeds < 1:
        raise PoolError(f"config.num_seeds={config.num_seeds}: at least one seed")
    os.makedirs(workdir, exist_ok=True)
    pools = []
    encoder_name = None
    if config.pools:
        embed, encoder_name = make_encoder(config)
        pools += word_pools(config, embed)
    if config.include_digits:
        pools.append(digits_pool(config))
    results = {"encoder": encoder_name, "num_seeds": config.num_seeds,
               "min_all_labels_accuracy": config.min_all_labels_accuracy,
               "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__}, "pools": {}, "skipped": {}}
    per_seed = {}
    with tqdm(total=len(pools) * len(methods), desc="egal", unit="run", dynamic_ncols=True) as bar:
        for name, *data in pools:
            result, seeds = run_pool(name, data, config, settings, methods, bar)
            if seeds is None:
                results["skipped"][name] = result
                continue
            results["pools"][name], per_seed[name] = result, seeds
            slug = "".join(ch if ch.isalnum() else "_" for ch in name)
            plot(name, results["pools"][name], os.path.join(workdir, f"{slug}.png"))
            # Each pool's size is its own set of programs, and XLA:CPU maps ~1000 memory regions per
            # compiled program: nine pools x seven methods pass Linux's default vm.max_map_count
            # (65530) and LLVM fails with "Cannot allocate memory". A finished pool's programs go.
            jax.clear_caches()
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "seeds.json"), "w") as f:
        json.dump({"num_seeds": config.num_seeds, "pools": per_seed}, f)
    for name, r in results["pools"].items():
        summary = ", ".join(f"{m} {v['final_accuracy']:.3f}" for m, v in r["methods"].items())
        print(f"{name} (every label: {r['all_labels_accuracy']:.3f}): final accuracy {summary}")
    for name, r in results["skipped"].items():
        print(f"{name}: skipped, a classifier on every label reaches {r['all_labels_accuracy']:.3f} "
              f"(config.min_all_labels_accuracy={config.min_all_labels_accuracy})")
    print(f"wrote {workdir}/results.json, seeds.json (every seed's figures) and a plot per pool")
    return results
