"""Prints the supersense SenseBERT predicts for each word of a sentence.

  python -m tasks.sensebert_predict --workdir=WORKDIR "The bass player sat on the bank of the river."

WORKDIR is a `sensebert_pretrain` training workdir (configs/sensebert_tiny.py writes one). Installed, this
is `sensebert-predict`.
"""

from __future__ import annotations

import argparse

from common.cli import user_errors, verbose_requested
from sensebert_jax.checkpoint import load_pretrained
from sensebert_jax.model import SenseBertForPretraining
from sensebert_jax.predict import format_tagged, predict_supersenses


def main(argv=None):
    ap = argparse.ArgumentParser(prog="sensebert-predict", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--verbose", action="store_true", help="tracebacks for argument errors too")
    ap.add_argument("sentence", nargs="+")
    args = ap.parse_args(argv)
    with user_errors(verbose_requested(argv)):
        setup, params, _ = load_pretrained(args.workdir)
        model = SenseBertForPretraining(setup.cfg)
        for sentence in args.sentence:
            print(format_tagged(predict_supersenses(model, params, setup.tokenizer, setup.supersense_matrix,
                                                    sentence)))


if __name__ == "__main__":
    main()
