"""Exemplar-guided active learning for word senses with rare classes, every method x seed x pool:

  python main.py --config=configs/egal_wsd.py --workdir=DIR [--config.num_seeds=N]

Pools: the pseudo-words of data/egal_pools (built by `python -m data.build_egal_pools`), each drawn at
every skew of `config.skews` (common : rare examples), with a balanced test set and the WordNet gloss
of each sense as its exemplar; and scikit-learn's digits with skewed classes (one held-out image of
each digit as its exemplar). Text is embedded at the target word by one of this project's encoders
(`config.encoder`): a Jamba checkpoint's hidden states at `config.encoder_layer`
(`jamba_jax.features`), or a sensebert_pretrain workdir's encoder, its last layer
(`sensebert_jax.encoder`); the results say which.

Writes DIR/results.json (per pool, per method: labels, mean accuracy and macro F1 over seeds with
their standard errors, rare labels spent, classes found, labels_to_find_common) and a PNG per pool.
"""

from __future__ import annotations

import gzip
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from active_learning import METHODS, PoolError, Settings, make_pool, run_seeds
from jamba_jax.features import EncoderLayerError, jamba_encoder
from sensebert_jax.encoder import sensebert_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLS_FILE = os.path.join(ROOT, "data", "egal_pools", "pseudowords.jsonl.gz")


# --- encoders ----------------------------------------------------------------------------------------------
def make_encoder(config):
    """(embed, description) of the encoder the config names (`jamba_jax.features`, `sensebert_jax.encoder`)."""
    if not os.path.isdir(config.encoder_checkpoint):
        raise PoolError(f"config.encoder_checkpoint={config.encoder_checkpoint!r} is not a directory: train one "
                        "first (python main.py for the tiny Jamba; configs/sensebert_tiny.py for SenseBERT)")
    if config.encoder == "jamba":
        try:
            return jamba_encoder(config.encoder_checkpoint, config.encoder_layer)
        except EncoderLayerError as e:
            raise PoolError(f"config.encoder_layer: {e}") from e
    if config.encoder == "sensebert":
        return sensebert_encoder(config.encoder_checkpoint)
    raise PoolError(f"config.encoder={config.encoder!r}; expected 'jamba' or 'sensebert'")


# --- pools -----------------------------------------------------------------------------------------------------
def read_pseudowords(names) -> list[dict]:
    if not os.path.exists(POOLS_FILE):
        raise PoolError(f"{POOLS_FILE} is missing: run python -m data.build_egal_pools")
    with gzip.open(POOLS_FILE, "rt", encoding="utf-8") as f:
        pools = {p["name"]: p for p in map(json.loads, f)}
    unknown = sorted(set(names) - set(pools))
    if unknown:
        raise PoolError(f"config.pools names {unknown}; the pseudo-words built are {sorted(pools)}")
    return [pools[n] for n in names]


def word_pools(config, embed):
    """(name, x, y, exemplars, x_test, y_test) per pseudo-word and skew; sense 0 is the common one."""
    out = []
    for p in read_pseudowords(config.pools):
        ex = p["examples"]
        vectors = embed([e["text"] for e in ex] + [e["text"] for e in p["exemplars"]],
                        [(e["start"], e["end"]) for e in ex] + [(e["start"], e["end"]) for e in p["exemplars"]])
        x_all, exemplars = vectors[:len(ex)], vectors[len(ex):]
        labels = np.asarray([e["label"] for e in ex])
        test = np.asarray([e["split"] == "test" for e in ex])
        for skew in config.skews:
            rng = np.random.RandomState(config.seed + skew)
            common = np.flatnonzero(~test & (labels == 0))
            rare_all = np.flatnonzero(~test & (labels == 1))
            n_common = len(common)
            n_rare = max(1, min(len(rare_all), n_common // skew))
            chosen = np.concatenate([common, rng.choice(rare_all, n_rare, replace=False)])
            out.append((f"{p['name']} 1:{skew}", x_all[chosen], labels[chosen], exemplars, x_all[test], labels[test]))
    return out


def digits_pool(config):
    """scikit-learn's digits: class c kept with frequency proportional to 0.5^c (digit 0 commonest),
    one held-out image per digit as its exemplar, 30 held-out images per digit as the test set."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.RandomState(config.seed)
    perm = rng.permutation(len(y))
    x, y = x[perm], y[perm]
    exemplar_idx = np.asarray([np.flatnonzero(y == c)[0] for c in range(10)])
    test_idx = np.concatenate([np.flatnonzero(y == c)[1:31] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(y)), np.concatenate([exemplar_idx, test_idx]))
    keep = []
    for c in range(10):
        members = rest[y[rest] == c]
        keep.append(members[:max(1, int(round(len(members) * 0.5 ** c)))])
    keep = np.concatenate(keep)
    return ("digits 0.5^c", x[keep], y[keep], x[exemplar_idx], x[test_idx], y[test_idx])


# --- the runner -------------------------------------------------------------------------------------------------
def settings_of(config) -> Settings:
    a = config.al
    return Settings(batch=a.batch, rounds=a.rounds, threshold=a.threshold, epsilon=a.epsilon,
                    thompson_scale=a.thompson_scale, fit_steps=a.fit_steps, fit_tol=a.fit_tol,
                    max_draws=a.max_draws)


def run_pool(name, data, config, settings, methods, bar) -> dict:
    x, y, exemplars, x_test, y_test = data
    a = config.al
    pool = make_pool(x, y, exemplars, x_test, y_test, settings, a.ess_target, a.uniform_mix, a.min_prob, name)
    keys = jax.random.split(jax.random.PRNGKey(config.seed), config.num_seeds)
    freq = (np.bincount(y, minlength=len(exemplars)) / len(y)).round(4).tolist()
    result = {"size": int(len(y)), "frequencies": freq, "common": np.asarray(pool.common).tolist(), "methods": {}}
    for method in methods:
        start = time.perf_counter()
        metrics, to_find = jax.block_until_ready(run_seeds(pool, settings, method, keys))
        metrics = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
        se = lambda v: (v.std(0, ddof=1) / np.sqrt(len(v))).tolist() if len(v) > 1 else [0.0] * v.shape[1]  # noqa
        result["methods"][method] = {
            "labels": metrics["labels"][0].astype(int).tolist(),
            "accuracy": metrics["accuracy"].mean(0).tolist(), "accuracy_se": se(metrics["accuracy"]),
            "macro_f1": metrics["macro_f1"].mean(0).tolist(), "macro_f1_se": se(metrics["macro_f1"]),
            "common_accuracy": metrics["common_accuracy"].mean(0).tolist(),
            "rare_labels": metrics["rare_labels"].mean(0).tolist(),
            "classes_found": metrics["classes_found"].mean(0).tolist(),
            "labels_to_find_common": float(np.asarray(to_find).mean()), "seconds": time.perf_counter() - start}
        bar.update(1)
        bar.set_postfix(pool=name, method=method)
    return result


def plot(name: str, result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for method, r in result["methods"].items():
        labels = np.asarray(r["labels"])
        for ax, key in ((axes[0], "accuracy"), (axes[1], "macro_f1")):
            mean, se = np.asarray(r[key]), np.asarray(r[f"{key}_se"])
            line, = ax.plot(labels, mean, label=method, lw=2 if method == "egal" else 1)
            ax.fill_between(labels, mean - 1.96 * se, mean + 1.96 * se, color=line.get_color(), alpha=0.15)
        axes[2].plot(labels, r["rare_labels"], label=method)
        axes[3].plot(labels, r["classes_found"], label=method)
    for ax, title in zip(axes, ("accuracy (balanced test)", "macro F1", "rare-class labels spent", "classes found"),
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel("labels")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: {result['size']} points, class frequencies {result['frequencies']}")
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
               "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__}, "pools": {}}
    with tqdm(total=len(pools) * len(methods), desc="egal", unit="run", dynamic_ncols=True) as bar:
        for name, *data in pools:
            results["pools"][name] = run_pool(name, data, config, settings, methods, bar)
            slug = "".join(ch if ch.isalnum() else "_" for ch in name)
            plot(name, results["pools"][name], os.path.join(workdir, f"{slug}.png"))
            # Each pool's size is its own set of programs, and XLA:CPU maps ~1000 memory regions per
            # compiled program: nine pools x seven methods pass Linux's default vm.max_map_count
            # (65530) and LLVM fails with "Cannot allocate memory". A finished pool's programs go.
            jax.clear_caches()
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    for name, r in results["pools"].items():
        summary = ", ".join(f"{m} {v['labels_to_find_common']:.1f}" for m, v in r["methods"].items())
        print(f"{name}: labels to find every common class: {summary}")
    print(f"wrote {os.path.join(workdir, 'results.json')} and a plot per pool")
    return results
