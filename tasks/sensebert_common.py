"""What the SenseBERT tasks share: the tokenizer, the supersense matrix M, the model config and its
parameter specs (`SenseBertBase`), and the fine-tuning tasks' data, loss and encoder loading
(`FinetuneTask`; evaluated on WordNet's own example sentences, data/build_sensebert_eval.py, split
by lemma, so test lemmas are unseen). config.init_checkpoint names a sensebert_pretrain workdir
whose encoder starts a fine-tuning model ("" = random init)."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from common.losses import token_nll
from sensebert_jax import SenseBertConfig, WordPieceTokenizer, token_supersense_matrix
from sensebert_jax.config import PRESETS, SenseBertConfigError
from sensebert_jax.tokenizer import load_whole_words
from training.checkpoint import CheckpointMismatchError, restore_run_params
from training.data import DataError, process_rows


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


EVAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sensebert_eval")


def read_rows(name: str, split: str) -> list[dict]:
    path = os.path.join(EVAL_DIR, f"{name}.jsonl.gz")
    if not os.path.exists(path):
        raise DataError(f"{path} is missing: run python -m data.build_sensebert_eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r["split"] == split]
    if not rows:
        raise DataError(f"{path} holds no {split!r} rows")
    return rows


def pieces_with_target(tok, text: str, start: int, end: int) -> tuple[list[int], int]:
    """(piece ids of the sentence, index among them of the target word's rightmost piece)."""
    before = [i for _, p in tok.words(text[:start]) for i in p]
    target = [i for _, p in tok.words(text[start:end]) for i in p]
    after = [i for _, p in tok.words(text[end:]) for i in p]
    return before + target + after, len(before) + len(target) - 1


class FinetuneTask(SenseBertBase):
    data_name = ""

    def __init__(self, config):
        super().__init__(config)
        self._pretrained = None
        if config.init_checkpoint:
            self._pretrained = self._load_encoder(config.init_checkpoint)

    def _load_encoder(self, path):
        meta, _, _ = restore_run_params(path, None)  # check what the checkpoint holds before reading arrays
        if meta.get("task") != "sensebert_pretrain":
            raise CheckpointMismatchError(f"{path}: not a sensebert_pretrain run (task {meta.get('task')!r})")
        mine = self.meta()["model"]
        diffs = sorted(k for k in mine if meta["model"].get(k) != mine[k] and k != "hidden_dropout_prob")
        if diffs:
            raise CheckpointMismatchError(f"{path}: pre-trained with a different model ({', '.join(diffs)} differ)")
        if meta["use_supersenses"] != self.use_supersenses:
            raise CheckpointMismatchError(f"{path} was pre-trained with use_supersenses={meta['use_supersenses']}; "
                                          f"set config.sensebert.use_supersenses to match")
        abstract = jax.eval_shape(lambda: self.init_params(jax.random.PRNGKey(0)))["encoder"]
        _, params, step = restore_run_params(path, {"encoder": abstract})
        print(f"encoder from {path} (step {step})")
        return jax.tree.map(np.asarray, params["encoder"])

    def init_params(self, rng):
        params = super().init_params(rng)
        if self._pretrained is not None:
            params = {**params, "encoder": jax.tree.map(jnp.asarray, self._pretrained)}
        return params

    # --- data ----------------------------------------------------------------------------------------
    def encode(self, row: dict) -> dict:
        raise NotImplementedError

    def _dataset(self, split, train, pidx, pcount):
        c = self.config
        ds = grain.MapDataset.source(read_rows(self.data_name, split))
        if train:
            ds = ds.shuffle(seed=c.seed).repeat(None)
        ds = ds.map(self.encode).batch(c.batch_size, drop_remainder=train)
        return ds.map(lambda b: process_rows(b, c.batch_size, pidx, pcount)).to_iter_dataset()

    def train_dataset(self, process_index, process_count):
        return self._dataset("train", True, process_index, process_count)

    def eval_dataset(self, process_index, process_count):
        return self._dataset("test", False, process_index, process_count)

    def _row(self, ids: list[int], types: list[int]) -> dict:
        n = self.config.seq_len
        if len(ids) > n:
            raise DataError(f"an example has {len(ids)} pieces, more than config.seq_len={n}")
        pad = n - len(ids)
        return {"input_ids": np.asarray(ids + [self.tokenizer.pad_id] * pad, np.int32),
                "attention_mask": np.asarray([1] * len(ids) + [0] * pad, np.int32),
                "token_type_ids": np.asarray(types + [0] * pad, np.int32), "weight": np.float32(1.0)}

    # --- loss --------------------------------------------------------------------------------------------
    def _logits(self, params, batch, rng):
        raise NotImplementedError

    def _sums(self, params, batch, rng):
        logits = self._logits(params, batch, rng)
        nll = token_nll(logits, batch["label"])
        w = batch["weight"]  # 0 on the all-zero rows that pad the last eval batch
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        return jnp.sum(nll * w), jnp.sum(w), jnp.sum(correct * w)

    def loss(self, params, batch, rng, frozen=None):
        nll, n, correct = self._sums(params, batch, rng)
        return nll, {"loss": nll, "accuracy": correct, "tokens": n}

    def eval_sums(self, params, batch, frozen=None):
        nll, n, correct = self._sums(params, batch, None)
        return {"nll": nll, "tokens": n, "accuracy": correct, "accuracy_n": n}

    def baseline(self, max_rows: int | None = None) -> tuple[str, float]:
        """(most frequent training label, its accuracy on the (first max_rows) test rows)."""
        label = collections.Counter(self.label_of(r) for r in read_rows(self.data_name, "train")).most_common(1)[0][0]
        test = read_rows(self.data_name, "test")[:max_rows]
        return self.label_name(label), sum(self.label_of(r) == label for r in test) / len(test)

    def on_end(self, params, frozen=None):
        name, acc = self.baseline(self.config.eval_batches * self.config.batch_size)
        print(f"most-frequent-label baseline ({name}): test accuracy {acc:.4f}")
