"""Auxiliary tuning against its baselines at equal training FLOPs (issues 14, 31), on CPU, in one command:

  (a) the frozen LM alone, the keyword as a text prompt (no training: the step-0 row of (c))
  (b) auxiliary tuning: the frozen LM + a small auxiliary Jamba (configs/aux_tuning_tiny.py)
  (c) full fine-tuning of the LM with the keyword prefix (configs/keyword_lm_tiny.py) at --finetune_lr
  (d) a model of the LM's size trained from scratch with the keyword prefix

each of (b)-(d) with and without the keyword-bag term (`config.aux.keyword_bag`), --seeds seeds each, all
--steps long; with --scratch_steps N also

  (e) (d) without the bag term trained N steps (its own cosine schedule): how much compute training
      from scratch needs to reach the frozen LM's perplexity (the convergence reference);

and with --finetune_steps N (f), (c) without the bag term trained N steps: where full fine-tuning flattens.

The frozen LM is the quick start's tiny Jamba trained --lm_steps steps (here, unless --lm names one).
Task: one keyword per document (a content word after its first words), matched by WordNet lemma in a
continuation sampled from <bos> (temperature 0.7, top-k 10); perplexity of the held-out text given its
keyword. Every run evaluates at step 0 and every --eval_every steps: curves against training FLOPs. A run whose
workdir already holds its last eval row is not run again (a stopped benchmark resumes where it was).

FLOPs per step: 6 x active parameters trained x the token slots they process (padding included: it is
computed) + 2 x the frozen LM's active parameters x its slots for (b): the 6N / 2N rule of matmuls;
attention scores (one layer in eight, <= 82 positions) and the bag term add under 2%. Tokens reported
are real text tokens (the loss's targets), padding excluded. Mean +- standard error over seeds in the
figure; a difference is claimed only where the 95% intervals (Student t, seeds - 1 degrees) are apart.

  python -m benchmarks.aux_tuning [--lm DIR] [--lm_steps 1000] [--steps 400] [--scratch_steps 3000] [--finetune_steps 1200]
                                  [--eval_every 100] [--seeds 3] [--jobs 2] [--out bench_aux]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")


def run(args: list[str], log: str) -> None:
    with open(log, "w") as f:
        out = subprocess.run([sys.executable, MAIN, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed: see {log}")


def read_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def finished(workdir: str, steps: int) -> bool:
    """Whether the run in `workdir` wrote its eval row at its last step."""
    try:
        return any(r["step"] == steps and "eval_loss" in r for r in read_rows(workdir))
    except (OSError, ValueError, KeyError):
        return False


def flops_per_step(lm_dir: str) -> dict[str, float]:
    """Training FLOPs of one optimizer step of each method (module docstring)."""
    import jamba_jax
    from configs import aux_tuning_tiny, jamba_tiny
    from jamba_jax import load_checkpoint

    c = aux_tuning_tiny.get_config()
    lm_cfg, _ = load_checkpoint(lm_dir)
    aux_cfg = jamba_jax.JambaConfig.from_dict({**c.model.to_dict(), "vocab_size": lm_cfg.vocab_size})
    n_lm, n_aux = jamba_jax.count_params(lm_cfg)["active"], jamba_jax.count_params(aux_cfg)["active"]
    rows, text, z = c.batch_size, c.seq_len, c.aux.max_keyword_tokens
    prefixed = text + z + 2  # <bos> [keyword tokens] "\n" text (tasks/keyword_lm.py)
    q = jamba_tiny.get_config()  # the frozen LM's pre-training step (the quick start's packed rows)
    return {"b": rows * (6 * n_aux * (z + text) + 2 * n_lm * text), "c": rows * 6 * n_lm * prefixed,
            "d": rows * 6 * n_lm * prefixed, "e": rows * 6 * n_lm * prefixed, "f": rows * 6 * n_lm * prefixed,
            "lm": q.batch_size * q.seq_len * 6 * n_lm, "n_lm": n_lm, "n_aux": n_aux}


def curve(rows: list[dict], step_flops: float) -> dict:
    """The eval rows of one run as arrays against steps, FLOPs and real text tokens seen."""
    tokens, seen = {0: 0.0}, 0.0
    for r in rows:
        if "loss" in r:
            seen += r.get("tokens", 0.0)
            tokens[r["step"]] = seen
    evals = [r for r in rows if "eval_loss" in r]
    steps = [r["step"] for r in evals]
    return {"step": steps, "flops": [s * step_flops for s in steps], "tokens": [tokens.get(s, np.nan) for s in steps],
            "perplexity": [r["eval_perplexity"] for r in evals], "keyword_rate": [r["eval_keyword_rate"] for r in evals],
            "any_keyword_rate": [r.get("eval_any_keyword_rate", np.nan) for r in evals]}


def jobs(args, lm: str) -> list[tuple[str, bool, int, int, list[str]]]:
    """(method, bag, seed, steps, main.py flags) of every run."""
    common = [f"--config.eval_every_steps={args.eval_every}", "--config.aux.min_keywords=1",
              "--config.aux.max_keywords=1", "--config.aux.eval_samples=128"]
    kinds = {"b": [f"--config={ROOT}/configs/aux_tuning_tiny.py", f"--config.frozen_lm={lm}", "--config.sample_keywords="],
             "c": [f"--config={ROOT}/configs/keyword_lm_tiny.py", f"--config.init_from={lm}",
                   f"--config.learning_rate={args.finetune_lr}"],
             "d": [f"--config={ROOT}/configs/keyword_lm_tiny.py", "--config.init_from="]}
    plan = [(m, bag, args.steps) for bag in (False, True) for m in "bcd"]
    plan += [("e", False, args.scratch_steps)] if args.scratch_steps else []
    plan += [("f", False, args.finetune_steps)] if args.finetune_steps else []
    return [(m, bag, seed, n, kinds[{"e": "d", "f": "c"}.get(m, m)] + common + [
                f"--config.num_train_steps={n}", f"--config.save_every_steps={n}",
                f"--config.aux.keyword_bag={bag}", f"--config.seed={seed}"])
            for seed in range(args.seeds) for m, bag, n in plan]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm", default="", help="a jamba_lm workdir to freeze (default: train one here)")
    parser.add_argument("--lm_steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--scratch_steps", type=int, default=0, help="steps of (e), (d) to convergence (0: no (e))")
    parser.add_argument("--finetune_steps", type=int, default=0, help="steps of (f), (c) run longer (0: no (f))")
    parser.add_argument("--finetune_lr", type=float, default=3e-4,
                        help="(c)'s peak rate (the LM's pre-training rate 3e-3 first costs it 20 perplexity points)")
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each a process)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_aux"))
    parser.add_argument("--report_only", action="store_true", help="tables and figure from --out's runs")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    lm = os.path.abspath(args.lm) if args.lm else os.path.join(args.out, "lm")
    if not args.lm and not args.report_only and not finished(lm, args.lm_steps):
        print(f"training the frozen LM (the quick start, {args.lm_steps} steps) ...", flush=True)
        run([f"--workdir={lm}", f"--config.num_train_steps={args.lm_steps}",
             f"--config.save_every_steps={args.lm_steps}", f"--config.eval_every_steps={args.lm_steps}"],
            os.path.join(args.out, "lm.log"))
    todo = jobs(args, lm)
    name = lambda m, bag, seed: f"{m}-{'bag' if bag else 'nobag'}-seed{seed}"  # noqa: E731
    workdir = lambda m, bag, seed: os.path.join(args.out, name(m, bag, seed))  # noqa: E731
    if not args.report_only:
        left = [t for t in todo if not finished(workdir(*t[:3]), t[3])]
        print(f"{len(todo) - len(left)} of {len(todo)} runs already done in {args.out}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run, extra + [f"--workdir={workdir(m, bag, s)}"],
                                   workdir(m, bag, s) + ".log"): name(m, bag, s) for m, bag, s, _, extra in left}
            for i, f in enumerate(concurrent.futures.as_completed(futures)):
                f.result()
                print(f"[{i + 1}/{len(futures)}] {futures[f]} done", flush=True)
    flops = flops_per_step(lm)
    runs = {name(m, bag, s): {"method": m, "bag": bag, "seed": s, **curve(read_rows(workdir(m, bag, s)), flops[m])}
            for m, bag, s, _, _ in todo}
    lm_rows = read_rows(lm)
    lm_ppl = [r["eval_perplexity"] for r in lm_rows if "eval_perplexity" in r][-1]
    from benchmarks.aux_tuning_report import report

    report(runs, flops, lm_ppl, args)


if __name__ == "__main__":
    main()
