"""SenseBERT pre-training as a task of the shared loop (and the plain-BERT baseline: the same task
with config.sensebert.use_supersenses=False drops the supersense input term and losses).

Objective per masked-LM target: L_MLM + (L_allowed + L_reg), the supersense terms averaged over
their own targets (the rightmost pieces of masked words with a non-empty A(w)).
"""

from __future__ import annotations

import grain
import jax.numpy as jnp

from sensebert_jax.losses import masked_lm_sum, supersense_loss_sums
from sensebert_jax.masking import pretraining_example
from sensebert_jax.model import SenseBertForPretraining
from sensebert_jax.predict import format_tagged, predict_supersenses
from sensebert_jax.tokenizer import WordPieceTokenizer
from tasks.sensebert_common import SenseBertBase
from training.data import document_stream, process_rows, text_source


def pretraining_dataset(docs, tok: WordPieceTokenizer, *, batch_size: int, seq_len: int, seed: int, train: bool,
                        process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of pretraining_example dicts (one sentence per row, padded), this process's rows.
    Masks are drawn per (example, epoch) from the seed, so a resumed run sees the same batches."""
    ds = document_stream(docs, batch_size, seed, train, process_count)
    ds = ds.random_map(lambda text, rng: pretraining_example(tok, text, seq_len, rng), seed=seed)
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.map(lambda b: process_rows(b, batch_size, process_index, process_count)).to_iter_dataset()


class SenseBertPretrainTask(SenseBertBase):
    name = "sensebert_pretrain"

    def build_model(self):
        return SenseBertForPretraining(self.cfg)

    def _dataset(self, split, train, pidx, pcount):
        c = self.config
        return pretraining_dataset(text_source(c.data, split), self.tokenizer, batch_size=c.batch_size,
                                   seq_len=c.seq_len, seed=c.seed, train=train, process_index=pidx,
                                   process_count=pcount)

    def train_dataset(self, process_index, process_count):
        return self._dataset("train", True, process_index, process_count)

    def eval_dataset(self, process_index, process_count):
        return self._dataset("validation", False, process_index, process_count)

    def _sums(self, params, batch, rng):
        mlm, ss = self._apply(params, batch, rng)
        mlm_sum = masked_lm_sum(mlm, batch["mlm_targets"], batch["mlm_weights"])
        allowed_sum, reg_sum = supersense_loss_sums(ss, batch["ss_allowed"], batch["ss_weights"])
        return mlm_sum, jnp.sum(batch["mlm_weights"]), allowed_sum, reg_sum, jnp.sum(batch["ss_weights"])

    def loss(self, params, batch, rng, frozen=None):
        mlm_sum, tokens, allowed_sum, reg_sum, ss_n = self._sums(params, batch, rng)
        per_target = tokens / jnp.maximum(ss_n, 1.0)  # supersense losses as means over their own targets
        objective = mlm_sum + (per_target * (allowed_sum + reg_sum) if self.use_supersenses else 0.0)
        return objective, {"loss": mlm_sum, "allowed_loss": per_target * allowed_sum,
                           "reg_loss": per_target * reg_sum, "tokens": tokens}

    def eval_sums(self, params, batch, frozen=None):
        mlm_sum, tokens, allowed_sum, reg_sum, ss_n = self._sums(params, batch, None)
        return {"nll": mlm_sum, "tokens": tokens, "allowed_loss": allowed_sum, "allowed_loss_n": ss_n,
                "reg_loss": reg_sum, "reg_loss_n": ss_n}

    def on_end(self, params, frozen=None):
        sentence = self.config.sensebert.sample_sentence
        if sentence and self.use_supersenses:
            tagged = predict_supersenses(self.model, params, self.tokenizer, self.supersense_matrix, sentence)
            print("supersenses:", format_tagged(tagged))


Task = SenseBertPretrainTask
