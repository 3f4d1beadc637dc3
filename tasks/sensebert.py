"""SenseBERT pre-training as a task of the shared loop (and the plain-BERT baseline: the same task
with config.sensebert.use_supersenses=False drops the supersense input term and losses).

Objective per masked-LM target: L_MLM + (L_allowed + L_reg), the supersense terms averaged over
their own targets (the rightmost pieces of masked words with a non-empty A(w)).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sensebert_jax import SenseBertConfig, WordPieceTokenizer, token_supersense_matrix
from sensebert_jax.config import PRESETS, SenseBertConfigError
from sensebert_jax.data import pretraining_dataset
from sensebert_jax.losses import masked_lm_sum, supersense_loss_sums
from sensebert_jax.model import SenseBertForPretraining
from sensebert_jax.predict import format_tagged, predict_supersenses
from sensebert_jax.tokenizer import load_whole_words
from training.data import text_source


class SenseBertBase:
    """What every SenseBERT task shares: the tokenizer, M, the model config and its param specs."""

    name = "sensebert"

    def __init__(self, config):
        self.config = config
        sb = config.sensebert
        self.tokenizer = WordPieceTokenizer(sb.vocab_file, load_whole_words(sb.whole_words_file))
        fields = dict(config.model.to_dict())
        preset = fields.pop("preset", "tiny")
        if preset not in PRESETS:
            raise SenseBertConfigError(f"config.model.preset={preset!r}: one of {sorted(PRESETS)}")
        vocab = fields.pop("vocab_size", -1)
        if vocab not in (-1, self.tokenizer.vocab_size):
            raise SenseBertConfigError(f"config.model.vocab_size={vocab} but the tokenizer has "
                                       f"{self.tokenizer.vocab_size} tokens (-1 takes the tokenizer's)")
        self.cfg = SenseBertConfig.from_dict({**PRESETS[preset], **fields, "vocab_size": self.tokenizer.vocab_size})
        self.use_supersenses = bool(sb.use_supersenses)
        m = token_supersense_matrix(self.tokenizer.vocab)
        self.supersense_matrix = jnp.asarray(m if self.use_supersenses else np.zeros_like(m))
        self.model = self.build_model()

    def build_model(self):
        raise NotImplementedError

    def extra_inputs(self) -> tuple:
        """Inputs after (ids, mask, types, M) that init needs (e.g. WiC's target positions)."""
        return ()

    def meta(self) -> dict:
        sb = self.config.sensebert
        return {"task": self.name, "model": dataclasses.asdict(self.cfg), "use_supersenses": self.use_supersenses,
                "vocab_file": sb.vocab_file, "whole_words_file": sb.whole_words_file}

    def _dummy_inputs(self):
        ids = jnp.zeros((1, 8), jnp.int32)
        return ids, jnp.ones_like(ids), jnp.zeros_like(ids), self.supersense_matrix

    def _init(self, rng):
        return self.model.init({"params": rng, "dropout": rng}, *self._dummy_inputs(), *self.extra_inputs())["params"]

    def init_params(self, rng):
        return nn.unbox(self._init(rng))

    def param_specs(self):
        return nn.get_partition_spec(jax.eval_shape(self._init, jax.random.PRNGKey(0)))

    def _apply(self, params, batch, rng, *extra):
        ids = batch["input_ids"]
        types = batch.get("token_type_ids", jnp.zeros_like(ids))
        return self.model.apply({"params": params}, ids, batch["attention_mask"], types,
                                self.supersense_matrix, *extra, deterministic=rng is None,
                                rngs=None if rng is None else {"dropout": rng})


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

    def loss(self, params, batch, rng):
        mlm_sum, tokens, allowed_sum, reg_sum, ss_n = self._sums(params, batch, rng)
        per_target = tokens / jnp.maximum(ss_n, 1.0)  # supersense losses as means over their own targets
        objective = mlm_sum + (per_target * (allowed_sum + reg_sum) if self.use_supersenses else 0.0)
        return objective, {"loss": mlm_sum, "allowed_loss": per_target * allowed_sum,
                           "reg_loss": per_target * reg_sum, "tokens": tokens}

    def eval_sums(self, params, batch):
        mlm_sum, tokens, allowed_sum, reg_sum, ss_n = self._sums(params, batch, None)
        return {"nll": mlm_sum, "tokens": tokens, "allowed_loss": allowed_sum, "allowed_loss_n": ss_n,
                "reg_loss": reg_sum, "reg_loss_n": ss_n}

    def on_end(self, params):
        sentence = self.config.sensebert.sample_sentence
        if sentence and self.use_supersenses:
            tagged = predict_supersenses(self.model, params, self.tokenizer, self.supersense_matrix, sentence)
            print("supersenses:", format_tagged(tagged))
