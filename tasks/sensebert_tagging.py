"""Supersense tagging on the shared loop: the tagged word's rightmost piece -> one of 45
supersenses (WordNet's example sentences, tagged with their synset's supersense). eval_accuracy is
reported with eval_loss; on_end prints the most-frequent-label baseline."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sensebert_jax.model import SenseBertForTokenClassification
from sensebert_jax.supersenses import NUM_SUPERSENSES, SUPERSENSES
from tasks.sensebert_common import FinetuneTask, pieces_with_target


class SupersenseTaggingTask(FinetuneTask):
    name = "sensebert_tagging"
    data_name = "tagging"

    def build_model(self):
        return SenseBertForTokenClassification(self.cfg, NUM_SUPERSENSES)

    label_of = staticmethod(lambda r: r["supersense"])
    label_name = staticmethod(lambda i: SUPERSENSES[i])

    def encode(self, row):
        tok = self.tokenizer
        pieces, t = pieces_with_target(tok, row["text"], row["start"], row["end"])
        out = self._row([tok.cls_id] + pieces + [tok.sep_id], [0] * (len(pieces) + 2))
        out.update(position=np.int32(t + 1), label=np.int32(row["supersense"]))
        return out

    def _logits(self, params, batch, rng):
        per_token = self._apply(params, batch, rng)
        return jnp.take_along_axis(per_token, batch["position"][:, None, None], axis=1)[:, 0]


Task = SupersenseTaggingTask
