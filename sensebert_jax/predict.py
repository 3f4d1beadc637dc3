"""Prints the supersense SenseBERT predicts for each word of a sentence (read at the word's
rightmost piece; words with an empty A(w), such as stop words and punctuation, get none).

  python -m sensebert_jax.predict --workdir=WORKDIR "The bass player sat on the bank of the river."

WORKDIR is a `sensebert_pretrain` training workdir (configs/sensebert_tiny.py writes one).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sensebert_jax.config import SenseBertConfig
from sensebert_jax.model import SenseBertForPretraining
from sensebert_jax.supersenses import SUPERSENSES, allowed_ids
from sensebert_jax.tokenizer import WordPieceTokenizer, load_whole_words, token_supersense_matrix
from training.checkpoint import restore_run_params


def predict_supersenses(model, params, tokenizer, supersense_matrix, sentence: str) -> list[tuple[str, str | None]]:
    """[(word, predicted supersense or None)] for a SenseBertForPretraining model."""
    words = tokenizer.words(sentence)
    ids = [tokenizer.cls_id] + [i for _, pieces in words for i in pieces] + [tokenizer.sep_id]
    if len(ids) > model.cfg.max_position_embeddings:
        raise ValueError(f"the sentence has {len(ids)} pieces, more than max_position_embeddings="
                         f"{model.cfg.max_position_embeddings}")
    arr = jnp.asarray([ids], jnp.int32)
    _, ss = model.apply({"params": params}, arr, jnp.ones_like(arr), jnp.zeros_like(arr), supersense_matrix)
    best = np.asarray(jnp.argmax(ss[0], axis=-1))
    out, pos = [], 1
    for word, pieces in words:
        pos += len(pieces)
        out.append((word, SUPERSENSES[int(best[pos - 1])] if allowed_ids(word.lower()) else None))
    return out


def format_tagged(tagged: list[tuple[str, str | None]]) -> str:
    return " ".join(f"{w}[{s}]" if s else w for w, s in tagged)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("sentence", nargs="+")
    args = ap.parse_args(argv)
    meta, _, _ = restore_run_params(args.workdir, None)
    if meta.get("task") != "sensebert_pretrain":
        raise SystemExit(f"{args.workdir}: not a sensebert_pretrain run (task {meta.get('task')!r})")
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
