"""Auxiliary tuning against its baselines at equal numbers of training tokens (issue 14), on CPU:

  (a) the frozen LM alone, the keywords as a text prompt (no training)
  (b) auxiliary tuning: the frozen LM + a small auxiliary Jamba (configs/aux_tuning_tiny.py)
  (c) full fine-tuning of the LM with the keyword prefix (configs/keyword_lm_tiny.py)
  (d) a model of the LM's size trained from scratch with the keyword prefix

The LM is the quick start's tiny Jamba (trained here first unless --lm names one). Each training run
is its own process (its peak RSS is its own) with --seeds seeds; reported: held-out keyword inclusion
rate of sampled continuations (every keyword, WordNet-lemma match; temperature 0.7, top-k 10), held-out
perplexity of the text given its keywords, training seconds, training FLOPs (6 x trained parameters
per token, plus 2 x the frozen LM's per token for (b)) and peak RSS; mean +- standard error over seeds.

  python -m benchmarks.aux_tuning [--lm workdir] [--steps 300] [--seeds 3] [--out bench_aux]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
PROBE = ("import atexit, resource, runpy, sys; atexit.register(lambda: print('MAXRSS_KB', "
         "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
         "sys.argv = [sys.argv[1]] + sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
METHODS = {"b": "auxiliary tuning (frozen LM + aux)", "c": "full fine-tuning, keyword prefix",
           "d": "from scratch, keyword prefix", "a": "frozen LM, keywords as prompt"}


def run(args: list[str], log: str) -> tuple[float, float]:
    """Runs main.py with args; returns (seconds, peak RSS GiB)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        out = subprocess.run([sys.executable, "-c", PROBE, MAIN, *args], stdout=f, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT})
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    rss_kb = int([line for line in out.stderr.splitlines() if line.startswith("MAXRSS_KB")][-1].split()[1])
    return seconds, rss_kb / 2**20


def last_eval(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "eval_loss" in r][-1]


def evaluate_frozen_lm(lm: str, seed: int) -> dict:
    """(a): the frozen LM scored and sampled with the keyword prefix, no training."""
    import jax
    import numpy as np

    from configs import keyword_lm_tiny
    from tasks.keyword_lm import KeywordLMTask
    from training.data import make_iterator

    config = keyword_lm_tiny.get_config()
    config.init_from, config.seed = lm, seed
    task = KeywordLMTask(config)
    params = task.init_params(None)
    step = jax.jit(task.eval_sums)
    nll = tokens = 0.0
    for i, batch in enumerate(make_iterator(task.eval_dataset(0, 1))):
        if i >= config.eval_batches:
            break
        sums = step(params, batch, None)
        nll, tokens = nll + float(sums["loss"]), tokens + float(sums["tokens"])
    return {"eval_loss": nll / tokens, "eval_perplexity": float(np.exp(nll / tokens)), **{
        f"eval_{k}": v for k, v in task.extra_eval(params, None).items()}}


def flops_per_token(lm_dir: str) -> dict[str, float]:
    import jamba_jax
    from configs import aux_tuning_tiny
    from jamba_jax import load_checkpoint

    lm_cfg, _ = load_checkpoint(lm_dir)
    aux_fields = aux_tuning_tiny.get_config().model.to_dict()
    aux_cfg = jamba_jax.JambaConfig.from_dict({**aux_fields, "vocab_size": lm_cfg.vocab_size})
    n_lm, n_aux = jamba_jax.count_params(lm_cfg)["active"], jamba_jax.count_params(aux_cfg)["active"]
    return {"b": 2 * n_lm + 6 * n_aux, "c": 6 * n_lm, "d": 6 * n_lm, "a": 0.0, "n_lm": n_lm, "n_aux": n_aux}


def mean_se(values):
    import numpy as np

    v = np.asarray(values, float)
    return v.mean(), (v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm", default="", help="a jamba_lm workdir to freeze (default: train the quick start's)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_aux"))
    parser.add_argument("--child-eval-a", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_eval_a:
        print("RESULT " + json.dumps(evaluate_frozen_lm(args.child_eval_a[0], int(args.child_eval_a[1]))))
        return
    os.makedirs(args.out, exist_ok=True)
    lm = os.path.abspath(args.lm) if args.lm else os.path.join(args.out, "lm")
    if not args.lm:
        print("training the frozen LM (the quick start) ...", flush=True)
        run([f"--workdir={lm}"], os.path.join(args.out, "lm.log"))
    common = [f"--config.num_train_steps={args.steps}", f"--config.eval_every_steps={args.steps}",
              f"--config.save_every_steps={args.steps}"]
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        runs = {"b": [f"--config={ROOT}/configs/aux_tuning_tiny.py", f"--config.frozen_lm={lm}",
                      "--config.sample_keywords="],
                "c": [f"--config={ROOT}/configs/keyword_lm_tiny.py", f"--config.init_from={lm}"],
                "d": [f"--config={ROOT}/configs/keyword_lm_tiny.py", "--config.init_from="]}
        for method, extra in runs.items():
            workdir = os.path.join(args.out, f"{method}-seed{seed}")
            seconds, rss = run(extra + common + [f"--config.seed={seed}", f"--workdir={workdir}"],
                               os.path.join(args.out, f"{method}-seed{seed}.log"))
            results[method].append({**last_eval(workdir), "seconds": seconds, "rss_gib": rss})
            print(method, seed, results[method][-1], flush=True)
        out = subprocess.run([sys.executable, "-m", "benchmarks.aux_tuning", "--child-eval-a", lm, str(seed)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            raise SystemExit(out.stderr[-3000:])
        results["a"].append({**json.loads(line[-1][len("RESULT "):]), "seconds": 0.0, "rss_gib": float("nan")})
        print("a", seed, results["a"][-1], flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(results, flops_per_token(lm), args)


def report(results, flops, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import machine, write_section
    from configs import aux_tuning_tiny

    c = aux_tuning_tiny.get_config()
    tokens = args.steps * c.batch_size * c.seq_len
    rows, names, rates, ppls = [], [], [], []
    for m in ("a", "b", "c", "d"):
        rs = results[m]
        rate, rate_se = mean_se([r["eval_keyword_rate"] for r in rs])
        ppl, ppl_se = mean_se([r["eval_perplexity"] for r in rs])
        secs = mean_se([r["seconds"] for r in rs])[0]
        rss = mean_se([r["rss_gib"] for r in rs])[0]
        tflops = flops[m] * tokens / 1e12
        rows.append(f"| ({m}) {METHODS[m]} | {rate:.3f} +- {rate_se:.3f} | {ppl:.1f} +- {ppl_se:.1f} | "
                    f"{secs:.0f} | {tflops:.3f} | {'-' if m == 'a' else f'{rss:.2f}'} |")
        names.append(f"({m})")
        rates.append((rate, rate_se))
        ppls.append((ppl, ppl_se))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, values, title in ((axes[0], rates, "keyword inclusion rate"), (axes[1], ppls, "perplexity given keywords")):
        ax.bar(names, [v for v, _ in values], yerr=[e for _, e in values], color=["#999", "#2a7", "#27a", "#a72"],
               capsize=4)
        ax.set_title(title)
    fig.suptitle(f"tiny Jamba, {args.steps} steps ({tokens:,} text tokens), {args.seeds} seeds")
    fig.tight_layout()
    png = os.path.join(ROOT, "benchmarks", "figures", "aux_tuning.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=110)
    b, d = results["b"], results["d"]
    claim = (f"(b) reaches a keyword rate of {mean_se([r['eval_keyword_rate'] for r in b])[0]:.3f} against (d)'s "
             f"{mean_se([r['eval_keyword_rate'] for r in d])[0]:.3f} with {flops['b'] / flops['d']:.2f}x its training "
             f"FLOPs per token ({flops['n_aux']:,} trained parameters beside {flops['n_lm']:,} frozen)")
    body = f"""## Auxiliary tuning vs its baselines (issue 14)

Command: `python -m benchmarks.aux_tuning --lm <quick-start workdir> --steps {args.steps} --seeds {args.seeds}`
Machine: {machine()}. Frozen LM: the quick start's tiny Jamba (`python main.py`, 300 steps). Each method
trains {args.steps} steps of {c.batch_size} documents (the same {tokens:,} text tokens, 1-3 keywords per
document); held-out: {c.aux.eval_samples} documents' keywords for the inclusion rate (every keyword, matched
by WordNet lemma, in a {c.aux.sample_tokens}-token continuation sampled at temperature {c.aux.temperature},
top-k {c.aux.top_k}) and {c.eval_batches} batches for the perplexity of the text given its keywords.
Mean +- standard error over {args.seeds} seeds (for (a), the sampling seed only).

| method | keyword rate | perplexity given keywords | train s | train TFLOPs | peak RSS GiB |
| --- | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

![aux tuning](benchmarks/figures/aux_tuning.png)

The report's claim (auxiliary tuning close to a comparable model trained from scratch, at a fraction
of its compute): here {claim}.
"""
    print(body)
    write_section("aux_tuning", body)


if __name__ == "__main__":
    main()
