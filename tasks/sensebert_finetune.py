"""SenseBERT fine-tuning on the shared loop, by `config.head` (`sensebert_jax.finetune.HEADS`):

  tagging  supersense tagging: the tagged word's rightmost piece -> one of 45 supersenses
  wic      word in context: [CLS] s1 [SEP] s2 [SEP] -> same synset or not

on WordNet's own example sentences, split by lemma (test lemmas unseen). config.init_checkpoint names a
sensebert_pretrain workdir whose encoder starts the model ("" = random init). eval_accuracy is reported
with eval_loss; on_end prints the most-frequent-label baseline.

  python main.py --config=configs/sensebert_tagging.py --config.init_checkpoint=workdir/sensebert
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.losses import token_nll
from sensebert_jax.checkpoint import load_pretrained_encoder
from sensebert_jax.finetune import HEADS, FinetuneDataError, majority_baseline, read_rows
from sensebert_jax.setup import SenseBertSetup
from training.data import record_batches
from training.task import Task


class SenseBertFinetuneTask(Task):
    name = "sensebert_finetune"
    eval_split = "test"

    def __init__(self, config):
        self.config = config
        if config.head not in HEADS:
            raise FinetuneDataError(f"config.head={config.head!r}: one of {sorted(HEADS)}")
        self.head = HEADS[config.head]
        self.setup = SenseBertSetup.from_config(config)
        self.model = self.head.model(self.setup.cfg)
        self._pretrained = None
        if config.init_checkpoint:
            self._pretrained = load_pretrained_encoder(config.init_checkpoint, self.setup)

    def meta(self) -> dict:
        return {**self.setup.meta(self.name), "head": self.config.head}

    def _init(self, rng):
        return self.setup.init(self.model, rng, *self.head.init_inputs)

    def init_params(self, rng):
        params = nn.unbox(self._init(rng))
        if self._pretrained is not None:
            params = {**params, "encoder": jax.tree.map(jnp.asarray, self._pretrained)}
        return params

    def param_specs(self, params):
        return nn.get_partition_spec(jax.eval_shape(self._init, jax.random.PRNGKey(0)))

    def dataset(self, split, train, process_index, process_count):
        c, tok = self.config, self.setup.tokenizer
        return record_batches(read_rows(self.head.data_name, split), lambda row: self.head.encode(tok, row, c.seq_len),
                              batch_size=c.batch_size, seed=c.seed, train=train, process_index=process_index,
                              process_count=process_count)

    def sums(self, params, batch, rng, frozen):
        """NLL and correct predictions of the labels; rows of weight 0 (padding the last eval batch) count
        for nothing."""
        logits = self.head.logits(lambda *extra: self.setup.apply(self.model, params, batch, rng, *extra), batch)
        w = batch["weight"]
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        return {"loss": jnp.sum(token_nll(logits, batch["label"]) * w), "tokens": jnp.sum(w),
                "accuracy": jnp.sum(correct * w)}

    def baseline(self, max_rows: int | None = None) -> tuple[str, float]:
        """(most frequent training label, its accuracy on the (first max_rows) test rows)."""
        return majority_baseline(self.head, max_rows)

    def on_end(self, params, frozen):
        name, acc = self.baseline(self.config.eval_batches * self.config.batch_size)
        print(f"most-frequent-label baseline ({name}): test accuracy {acc:.4f}")


Task = SenseBertFinetuneTask
