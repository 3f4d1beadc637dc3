"""SenseBERT pre-training as a task of the shared loop (and the plain-BERT baseline: the same task
with config.sensebert.use_supersenses=False drops the supersense input term and losses).

Objective per masked-LM target: L_MLM + (L_allowed + L_reg), the supersense terms averaged over
their own targets (the rightmost pieces of masked words with a non-empty A(w)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sensebert_jax.losses import masked_lm_sum, supersense_loss_sums
from sensebert_jax.masking import pretraining_example
from sensebert_jax.model import SenseBertForPretraining
from sensebert_jax.predict import format_tagged, predict_supersenses
from sensebert_jax.setup import SenseBertSetup
from training.data import example_batches, text_source
from training.task import Task


class SenseBertPretrainTask(Task):
    name = "sensebert_pretrain"

    def __init__(self, config):
        self.config = config
        self.setup = SenseBertSetup.from_config(config)
        self.model = SenseBertForPretraining(self.setup.cfg)

    def meta(self) -> dict:
        return self.setup.meta(self.name)

    def _init(self, rng):
        return self.setup.init(self.model, rng)

    def init_params(self, rng):
        return nn.unbox(self._init(rng))

    def param_specs(self, params):
        return nn.get_partition_spec(jax.eval_shape(self._init, jax.random.PRNGKey(0)))

    def dataset(self, split, train, process_index, process_count):
        """One sentence per row with its masks, drawn per (sentence, epoch) from the seed."""
        c, tok = self.config, self.setup.tokenizer

        def example(text, rng):
            return pretraining_example(tok, text, c.seq_len, rng)

        return example_batches(text_source(c.data, split), example, batch_size=c.batch_size, seed=c.seed, train=train,
                               process_index=process_index, process_count=process_count)

    def sums(self, params, batch, rng, frozen):
        mlm, ss = self.setup.apply(self.model, params, batch, rng)
        mlm_sum = masked_lm_sum(mlm, batch["mlm_targets"], batch["mlm_weights"])
        allowed_sum, reg_sum = supersense_loss_sums(ss, batch["ss_allowed"], batch["ss_weights"])
        tokens, ss_n = jnp.sum(batch["mlm_weights"]), jnp.sum(batch["ss_weights"])
        per_target = tokens / jnp.maximum(ss_n, 1.0)  # supersense losses as means over their own targets
        objective = mlm_sum + (per_target * (allowed_sum + reg_sum) if self.setup.use_supersenses else 0.0)
        return {"loss": mlm_sum, "tokens": tokens, "objective": objective, "allowed_loss": allowed_sum,
                "allowed_loss_n": ss_n, "reg_loss": reg_sum, "reg_loss_n": ss_n}

    def on_end(self, params, frozen):
        sentence = self.config.sensebert.sample_sentence
        if sentence and self.setup.use_supersenses:
            tagged = predict_supersenses(self.model, params, self.setup.tokenizer, self.setup.supersense_matrix,
                                         sentence)
            print("supersenses:", format_tagged(tagged))


Task = SenseBertPretrainTask
