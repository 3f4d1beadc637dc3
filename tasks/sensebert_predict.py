"""Prints the supersense SenseBERT predicts for each word of a sentence.

  python -m tasks.sensebert_predict --workdir=WORKDIR "The bass player sat on the bank of the river."

WORKDIR is a `sensebert_pretrain` training workdir (configs/sensebert_tiny.py writes one).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.errors import UserError, user_errors, verbose_requested
from sensebert_jax.config import SenseBertConfig
from sensebert_jax.model import SenseBertForPretraining
from sensebert_jax.predict import format_tagged, predict_supersenses
from sensebert_jax.tokenizer import WordPieceTokenizer, load_whole_words, token_supersense_matrix
from training.checkpoint import restore_run_params


class NotSenseBertPretrainingError(UserError):
    """The workdir is not a sensebert_pretrain run."""


def main(argv=None):
    ap = argparse.ArgumentParser(prog="sensebert-predict", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--verbose", action="store_true", help="tracebacks for argument errors too")
    ap.add_argument("sentence", nargs="+")
    args = ap.parse_args(argv)
    with user_errors(verbose_requested(argv)):
        meta, _, _ = restore_run_params(args.workdir, None)
        if meta.get("task") != "sensebert_pretrain":
            raise NotSenseBertPretrainingError(f"{args.workdir}: not a sensebert_pretrain run (its task is "
                                               f"{meta.get('task')!r})")
        cfg = SenseBertConfig.from_dict(meta["model"])
        tok = WordPieceTokenizer(meta.get("vocab_file", ""), load_whole_words(meta.get("whole_words_file", "")))
        model = SenseBertForPretraining(cfg)
        m = jnp.asarray(token_supersense_matrix(tok.vocab))
        ids = jnp.zeros((1, 4), jnp.int32)
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids, ids, m)["params"])
        _, params, _ = restore_run_params(args.workdir, nn.unbox(abstract))
        for sentence in args.sentence:
            print(format_tagged(predict_supersenses(model, params, tok, m, sentence)))

if __name__ == "__main__":
    main()
