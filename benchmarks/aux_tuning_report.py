"""The tables, figure and BENCHMARKS.md section of `benchmarks.aux_tuning` from its runs' curves."""

from __future__ import annotations

import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"b": "(b) auxiliary tuning", "c": "(c) full fine-tuning", "d": "(d) from scratch", "e": "(e) from scratch, long",
         "f": "(f) full fine-tuning, long"}
COLORS = {"b": "#2a7", "c": "#27a", "d": "#a72", "e": "#a27", "f": "#7ad"}


def stats(values) -> tuple[float, float, float]:
    """(mean, standard error, half-width of the 95% Student-t interval) over seeds."""
    from scipy import stats as st

    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), 0.0, 0.0
    se = v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(se), float(se * st.t.ppf(0.975, len(v) - 1))


def at_flops(run: dict, key: str, flops: float) -> float:
    """The run's `key` at `flops` training FLOPs, linear between its eval points (nan past its end)."""
    x, y = np.asarray(run["flops"]), np.asarray(run[key])
    return float(np.interp(flops, x, y)) if flops <= x[-1] + 1e-6 else float("nan")


def group(runs: dict, method: str, bag: bool) -> list[dict]:
    return [r for r in runs.values() if r["method"] == method and r["bag"] == bag]


def groups(runs: dict) -> list[tuple[str, bool, list[dict]]]:
    """(method, bag, runs) of every setting that was run, in table order."""
    return [(m, bag, g) for m in "bcdef" for bag in (False, True) if (g := group(runs, m, bag))]


def reach(run_group: list[dict], key: str, target: float) -> float:
    """Training FLOPs at which the seeds' mean curve of `key` first falls to `target` (linear between
    evals; nan if it never does)."""
    x = np.asarray(run_group[0]["flops"], float)
    y = np.mean([r[key] for r in run_group], axis=0)
    below = np.nonzero(y <= target)[0]
    if not len(below):
        return float("nan")
    i = below[0]
    return float(x[0]) if i == 0 else float(x[i - 1] + (x[i] - x[i - 1]) * (y[i - 1] - target) / (y[i - 1] - y[i]))


def fmt(s) -> str:
    return f"{s[0]:.3f} +- {s[1]:.3f}" if s[0] < 10 else f"{s[0]:.1f} +- {s[1]:.1f}"


def apart(a, b) -> bool:
    """Whether two (mean, se, half-width) intervals are apart; never with one seed (no interval)."""
    return a[2] > 0 and b[2] > 0 and (a[0] + a[2] < b[0] - b[2] or b[0] + b[2] < a[0] - a[2])


def final_rows(runs: dict) -> list[str]:
    rows = []
    frozen = group(runs, "c", False)  # (a): (c)'s step-0 row, the LM alone prompted with the keyword
    rows.append(f"| (a) frozen LM, keyword as prompt | - | {fmt(stats([r['keyword_rate'][0] for r in frozen]))} | "
                f"{fmt(stats([r['perplexity'][0] for r in frozen]))} | 0 | 0 |")
    for m, bag, g in groups(runs):
        rows.append(f"| {NAMES[m]} | {'yes' if bag else 'no'} | {fmt(stats([r['keyword_rate'][-1] for r in g]))} | "
                    f"{fmt(stats([r['perplexity'][-1] for r in g]))} | {g[0]['flops'][-1] / 1e12:.2f} | "
                    f"{np.mean([r['tokens'][-1] for r in g]):,.0f} |")
    return rows


def matched(runs: dict) -> tuple[list[str], list[str]]:
    """(b) against (d) (and (c)) at half and all of (b)'s training FLOPs: table rows and the claims the
    intervals allow."""
    rows, claims = [], []
    for bag in (False, True):
        b = group(runs, "b", bag)
        flops = b[0]["flops"]
        for i in (len(flops) // 2, len(flops) - 1):
            budget = flops[i]
            for key, label in (("keyword_rate", "keyword rate"), ("perplexity", "perplexity")):
                sb = stats([r[key][i] for r in b])
                others = {m: stats([at_flops(r, key, budget) for r in group(runs, m, bag)]) for m in "cd"}
                rows.append(f"| {'yes' if bag else 'no'} | {budget / 1e12:.2f} | {label} | {fmt(sb)} | "
                            f"{fmt(others['d'])} | {fmt(others['c'])} |")
                sd, where = others["d"], f"{'with' if bag else 'without'} the bag term, at {budget / 1e12:.2f} TFLOPs"
                if apart(sb, sd):
                    better = (sb[0] > sd[0]) == (key == "keyword_rate")
                    claims.append(f"{where} (b)'s {label} ({sb[0]:.3f}) is {'better' if better else 'worse'} than "
                                  f"(d)'s ({sd[0]:.3f}), 95% intervals apart")
                else:
                    claims.append(f"{where} (b) and (d) do not differ in {label} beyond the noise ({sb[0]:.3f} vs "
                                  f"{sd[0]:.3f}; 95% intervals overlap)")
    return rows, claims


def bag_effect(runs: dict) -> str:
    """What the bag term does to each method's final keyword rate."""
    parts = []
    for m in "bcd":
        off, on = (stats([r["keyword_rate"][-1] for r in group(runs, m, bag)]) for bag in (False, True))
        parts.append(f"{NAMES[m]} {off[0]:.3f} -> {on[0]:.3f}{' (apart)' if apart(off, on) else ' (overlap)'}")
    return "- the keyword-bag term, final keyword rate without -> with it: " + "; ".join(parts) + ";"


def convergence(runs: dict, lm_flops: float) -> str:
    """What training from scratch long ((e)) needs to reach the frozen LM and (b), against (b)'s budget."""
    prompted = stats([r["perplexity"][0] for r in group(runs, "c", False)])
    b = group(runs, "b", False)
    b_ppl, budget = stats([r["perplexity"][-1] for r in b]), b[0]["flops"][-1]
    lm_ppl = stats([r["perplexity"][0] for r in b])  # (b) at step 0: the frozen LM, no keyword
    e = group(runs, "e", False)
    if not e:
        d = stats([r["perplexity"][-1] for r in group(runs, "d", False)])
        return (f"- (d) ends at perplexity {d[0]:.1f} given the keyword against the frozen LM's {prompted[0]:.1f} with the "
                f"same prefix ((a)): this budget does not show what training from scratch reaches (run --scratch_steps).")
    end = stats([r["perplexity"][-1] for r in e])
    last = np.mean([r["perplexity"][-2] for r in e])
    steps, flops = e[0]["step"][-1], e[0]["flops"][-1]

    def when(target: float, what: str) -> str:
        f = reach(e, "perplexity", target)
        if np.isnan(f):
            return f"does not reach {what} ({target:.1f}) within its {flops / 1e12:.1f} TFLOPs ({flops / budget:.0f}x (b)'s)"
        rate = np.mean([at_flops(r, "keyword_rate", f) for r in e])
        return (f"reaches {what} ({target:.1f}) at {f / 1e12:.1f} TFLOPs, {f / budget:.1f}x (b)'s whole budget "
                f"(keyword rate there {rate:.3f})")

    return (f"- (e), from scratch without the bag term for {steps} steps ({flops / 1e12:.1f} TFLOPs), ends at "
            f"perplexity {fmt(end)} given the keyword (keyword rate {fmt(stats([r['keyword_rate'][-1] for r in e]))}); "
            f"its last eval interval lowered the perplexity by {100 * (1 - end[0] / last):.1f}%. Its mean curve "
            f"{when(prompted[0], '(a), the frozen LM prompted')} and {when(b_ppl[0], '(b) without the bag term')}; "
            f"the frozen LM itself, not prompted, is at {lm_ppl[0]:.1f} on this text. (b) reuses the frozen LM, whose "
            f"pre-training took {lm_flops / 1e12:.1f} TFLOPs ({lm_flops / budget:.0f}x (b)'s budget); (e) starts from nothing.")


def flattening(runs: dict) -> str:
    """How much each setting's perplexity still moved over its last eval interval (mean over seeds)."""
    def change(g):
        return 100 * (np.mean([r["perplexity"][-1] for r in g]) / np.mean([r["perplexity"][-2] for r in g]) - 1)

    parts = [f"{NAMES[m]}{', bag' if bag else ''} {change(g):+.1f}%" for m, bag, g in groups(runs)]
    line = "- perplexity change over each run's last eval interval (flat is near 0): " + "; ".join(parts) + ";"
    c = group(runs, "c", False)
    start, first = (np.mean([r["perplexity"][i] for r in c]) for i in (0, 1))
    if first > start:
        line += (f"\n- (c) first loses perplexity at its rate ({start:.1f} -> {first:.1f} at step {c[0]['step'][1]}) "
                 f"before it falls: a lower --finetune_lr would serve it better;")
    return line


def figure(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in ((axes[0], "keyword_rate", "keyword rate (lemma match)"),
                           (axes[1], "perplexity", "perplexity of the text given its keyword")):
        frozen = stats([r[key][0] for r in group(runs, "c", False)])
        ax.axhline(frozen[0], color="#999", ls=":", label="(a) frozen LM, prompted")
        for m, bag, g in groups(runs):
            x = np.asarray(g[0]["flops"])[1:] / 1e12  # step 0 (no training) has no place on a log axis
            s = [stats([r[key][i] for r in g]) for i in range(1, len(x) + 1)]
            ax.errorbar(x, [v[0] for v in s], yerr=[v[1] for v in s], color=COLORS[m], ls="-" if bag else "--",
                        marker="o", ms=3, capsize=3, label=f"{NAMES[m]}{', bag' if bag else ''}")
        ax.set_xlabel("training TFLOPs (from the first eval)")
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("tiny Jamba: mean +- standard error over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(runs: dict, flops: dict, lm_perplexity: float, args) -> None:
    from benchmarks.common import machine, write_section
    from configs import aux_tuning_tiny

    out = os.path.join(ROOT, "benchmarks", "results", "aux_tuning")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "runs.json"), "w") as f:
        json.dump({"flops_per_step": flops, "lm_perplexity": lm_perplexity, "runs": runs}, f, indent=1)
    png = os.path.join(ROOT, "benchmarks", "figures", "aux_tuning.png")
    figure(runs, png)
    c = aux_tuning_tiny.get_config()
    rows, claims = matched(runs)
    seeds = len(group(runs, "b", False))
    body = f"""## Auxiliary tuning vs its baselines at equal training FLOPs (issues 14, 31)

Command: `python -m benchmarks.aux_tuning --lm_steps {args.lm_steps} --steps {args.steps}{f' --scratch_steps {args.scratch_steps}' if args.scratch_steps else ''}{f' --finetune_steps {args.finetune_steps}' if args.finetune_steps else ''}
--eval_every {args.eval_every} --seeds {seeds}` (one command: the frozen LM, every run, this section; every run's
curve in `benchmarks/results/aux_tuning/runs.json`). Machine: {machine()}, {args.jobs} runs at a time.
Frozen LM: the quick start's tiny Jamba ({flops['n_lm']:,} active parameters) trained {args.lm_steps}
steps, validation perplexity {lm_perplexity:.1f} on the corpus. Auxiliary model: {flops['n_aux']:,} active
parameters (plus {c.model.hidden_size} with the bag term). Task: one keyword per document; rate =
fraction of {c.aux.sample_tokens}-token continuations (from <bos>, temperature {c.aux.temperature}, top-k
{c.aux.top_k}) of 128 held-out documents' keywords that contain it, matched by WordNet lemma (with one
keyword, "any keyword" is the same rate); perplexity of {c.eval_batches} held-out batches' text given its
keyword. (b), (c) and (d) train {args.steps} steps{f', (e) {args.scratch_steps}' if args.scratch_steps else ''}{f', (f) {args.finetune_steps}' if args.finetune_steps else ''}, of {c.batch_size} documents at peak rates (aux
{c.learning_rate}, (c) and (f) {args.finetune_lr:g}, (d) and (e) 3e-3), evaluated every {args.eval_every} steps; mean +- standard error over
{seeds} seeds. FLOPs: the 6N / 2N matmul rule over the token slots each model processes
({flops['b'] / 1e9:.1f} GFLOPs a step for (b), {flops['d'] / 1e9:.1f} for (c) to (f)).

At the end of each run:

| method | bag term | keyword rate | perplexity given the keyword | train TFLOPs | real text tokens |
| --- | --- | ---: | ---: | ---: | ---: |
{chr(10).join(final_rows(runs))}

At equal training FLOPs, half and all of (b)'s ((d) and (c) read off their curves, linear between evals):

| bag term | TFLOPs | metric | (b) auxiliary tuning | (d) from scratch | (c) full fine-tuning |
| --- | ---: | --- | ---: | ---: | ---: |
{chr(10).join(rows)}

![aux tuning](benchmarks/figures/aux_tuning.png)

What the data support (a difference is claimed only where the 95% Student-t intervals over seeds are
apart):
{chr(10).join('- ' + c + ';' for c in claims)}
{bag_effect(runs)}
{flattening(runs)}
{convergence(runs, flops['lm'] * args.lm_steps)}
"""
    print(body)
    write_section("aux_tuning", body)
