"""The supersense SenseBERT predicts for each word of a sentence (read at the word's rightmost
piece; words with an empty A(w), such as stop words and punctuation, get none). The command line
that reads a training workdir is `tasks/sensebert_predict.py`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sensebert_jax.supersenses import SUPERSENSES, allowed_ids
from sensebert_jax.tokenizer import TokenizerError


def predict_supersenses(model, params, tokenizer, supersense_matrix, sentence: str) -> list[tuple[str, str | None]]:
    """[(word, predicted supersense or None)] for a SenseBertForPretraining model."""
    words = tokenizer.words(sentence)
    ids = [tokenizer.cls_id] + [i for _, pieces in words for i in pieces] + [tokenizer.sep_id]
    if len(ids) > model.cfg.max_position_embeddings:
        raise TokenizerError(f"the sentence has {len(ids)} pieces, more than max_position_embeddings="
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
