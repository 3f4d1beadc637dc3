"""Tiny SenseBERT vs a tiny BERT pre-trained identically (same data, steps, model; BERT lacks the
supersense input term and losses), then fine-tuned on supersense tagging and word-in-context
(WordNet examples, test lemmas unseen); plus pre-training throughput of both.

  python -m benchmarks.sensebert [--pretrain_steps 1000 --finetune_steps 300]

The paper's comparison (Levine et al. 2020, tables 1 and 2) at our scale, reported whichever way
it comes out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import jax
import numpy as np

import tasks
from benchmarks.common import machine, time_fn, write_section
from configs import sensebert_tagging, sensebert_tiny, sensebert_wic
from sensebert_jax.finetune import read_rows
from tasks.sensebert_finetune import SenseBertFinetuneTask
from tasks.sensebert_pretrain import SenseBertPretrainTask
from training.data import make_iterator
from training.optim import make_optimizer
from training.step import init_state, make_train_step


def throughput(config, repeats):
    """Pieces (real tokens) per second of the jitted pre-training step."""
    task = SenseBertPretrainTask(config)
    optimizer = make_optimizer(config)
    state = jax.jit(lambda r: init_state(task, optimizer, r))(jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(task, optimizer, 1), donate_argnums=(0,))
    batch = next(make_iterator(task.train_dataset(0, 1)))
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    return float(np.sum(batch["attention_mask"])) / time_fn(run, warmup=2, repeats=repeats)


def last_eval(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if "eval_loss" in m][-1]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain_steps", type=int, default=1000)
    ap.add_argument("--finetune_steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="sensebert_bench_")
    rows, speed = [], {}
    baselines = {}
    for name, use in (("SenseBERT", True), ("BERT", False)):
        c = sensebert_tiny.get_config()
        c.sensebert.use_supersenses, c.num_train_steps = use, args.pretrain_steps
        c.eval_every_steps = c.save_every_steps = args.pretrain_steps
        c.sensebert.sample_sentence = ""
        speed[name] = throughput(c, args.repeats)
        pre = os.path.join(root, name)
        tasks.run(c, pre)
        pre_eval = last_eval(pre)
        result = {"mlm": pre_eval["eval_loss"]}
        for task_name, get_config in (("tagging", sensebert_tagging.get_config), ("wic", sensebert_wic.get_config)):
            f = get_config()
            f.sensebert.use_supersenses, f.init_checkpoint = use, pre
            f.num_train_steps = f.eval_every_steps = f.save_every_steps = args.finetune_steps
            wd = os.path.join(root, f"{name}_{task_name}")
            tasks.run(f, wd)
            result[task_name] = last_eval(wd)["eval_accuracy"]
            baselines[task_name] = SenseBertFinetuneTask(f).baseline()
        rows.append((name, result))
        print(name, result, flush=True)
    n_test = {t: len(read_rows(t, "test")) for t in ("tagging", "wic")}

    def acc(r, t):  # with its binomial standard error over the test rows
        return f"{r[t]:.4f} +- {math.sqrt(r[t] * (1 - r[t]) / n_test[t]):.4f}"

    table = [f"| {n} | {speed[n]:,.0f} | {r['mlm']:.3f} | {acc(r, 'tagging')} | {acc(r, 'wic')} |" for n, r in rows]
    (tl, ta), (wl, wa) = baselines["tagging"], baselines["wic"]
    table.append(f"| most frequent training label | - | - | {ta:.4f} ({tl}) | {wa:.4f} ({wl}) |")
    body = "\n".join([
        "## SenseBERT vs BERT (tiny, CPU)", "",
        f"Command: `python -m benchmarks.sensebert --pretrain_steps {args.pretrain_steps} --finetune_steps "
        f"{args.finetune_steps}` ({machine()}). Both pre-trained with configs/sensebert_tiny.py (128 wide, 4 layers, "
        f"batch 32 x 48 pieces, {args.pretrain_steps} steps on the bundled WordNet corpus); BERT is the same run with "
        "`use_supersenses=False` (no supersense input term, no supersense losses). Then each encoder is fine-tuned "
        f"{args.finetune_steps} steps on supersense tagging (configs/sensebert_tagging.py) and word in context "
        "(configs/sensebert_wic.py), scored on the whole test split (lemmas unseen in training). Throughput: "
        f"real pieces per second of the jitted pre-training step, median of {args.repeats}.", "",
        "| model | pre-training pieces/s | eval MLM loss | supersense tagging accuracy | WiC accuracy |",
        "|---|---|---|---|---|", *table, "",
        f"Test rows: {n_test['tagging']} tagging, {n_test['wic']} WiC pairs; +- is one binomial standard error. "
        "SenseBERT's pre-training step also runs the supersense head and losses (the throughput ratio), and its "
        "masked-LM loss pays for the two extra objectives at this size."])
    write_section("sensebert", body)


if __name__ == "__main__":
    main()
