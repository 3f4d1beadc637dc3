"""Word in context on the shared loop: [CLS] s1 [SEP] s2 [SEP] -> same synset or not, from [CLS]
and the target word's rightmost piece in each sentence (pairs of WordNet examples of one lemma)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sensebert_jax.model import SenseBertForWordInContext
from tasks.sensebert_common import FinetuneTask, pieces_with_target


class WordInContextTask(FinetuneTask):
    name = "sensebert_wic"
    data_name = "wic"

    def build_model(self):
        return SenseBertForWordInContext(self.cfg)

    def extra_inputs(self):
        return (jnp.zeros((1, 2), jnp.int32),)

    label_of = staticmethod(lambda r: r["label"])
    label_name = staticmethod(lambda i: "same sense" if i else "different sense")

    def encode(self, row):
        tok = self.tokenizer
        p1, t1 = pieces_with_target(tok, row["text1"], row["start1"], row["end1"])
        p2, t2 = pieces_with_target(tok, row["text2"], row["start2"], row["end2"])
        ids = [tok.cls_id] + p1 + [tok.sep_id] + p2 + [tok.sep_id]
        out = self._row(ids, [0] * (len(p1) + 2) + [1] * (len(p2) + 1))
        out.update(targets=np.asarray([t1 + 1, len(p1) + 2 + t2], np.int32), label=np.int32(row["label"]))
        return out

    def _logits(self, params, batch, rng):
        return self._apply(params, batch, rng, batch["targets"])


Task = WordInContextTask
