"""SenseBERT fine-tuning tasks on the shared loop, evaluated on WordNet's own example sentences
(data/build_sensebert_eval.py; split by lemma, so test lemmas are unseen):

  sensebert_tagging   supersense tagging: the tagged word's rightmost piece -> one of 45 supersenses
  sensebert_wic       word in context: [CLS] s1 [SEP] s2 [SEP] -> same synset or not, from [CLS]
                      and the target word's rightmost piece in each sentence

config.init_checkpoint names a sensebert_pretrain workdir whose encoder starts the model ("" =
random init). eval_accuracy is reported with eval_loss; on_end prints it beside the trivial
baseline (most frequent training label).
"""

from __future__ import annotations

import collections
import gzip
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from sensebert_jax.model import SenseBertForTokenClassification, SenseBertForWordInContext
from sensebert_jax.supersenses import NUM_SUPERSENSES, SUPERSENSES
from tasks.sensebert import SenseBertBase
from training.checkpoint import CheckpointMismatchError, restore_run_params
from training.data import DataError, process_rows

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


class _FinetuneTask(SenseBertBase):
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
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["label"][:, None], axis=-1)[:, 0]
        w = batch["weight"]  # 0 on the all-zero rows that pad the last eval batch
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        return jnp.sum(nll * w), jnp.sum(w), jnp.sum(correct * w)

    def loss(self, params, batch, rng):
        nll, n, correct = self._sums(params, batch, rng)
        return nll, {"loss": nll, "accuracy": correct, "tokens": n}

    def eval_sums(self, params, batch):
        nll, n, correct = self._sums(params, batch, None)
        return {"nll": nll, "tokens": n, "accuracy": correct, "accuracy_n": n}

    def baseline(self, max_rows: int | None = None) -> tuple[str, float]:
        """(most frequent training label, its accuracy on the (first max_rows) test rows)."""
        label = collections.Counter(self.label_of(r) for r in read_rows(self.data_name, "train")).most_common(1)[0][0]
        test = read_rows(self.data_name, "test")[:max_rows]
        return self.label_name(label), sum(self.label_of(r) == label for r in test) / len(test)

    def on_end(self, params):
        name, acc = self.baseline(self.config.eval_batches * self.config.batch_size)
        print(f"most-frequent-label baseline ({name}): test accuracy {acc:.4f}")


class SupersenseTaggingTask(_FinetuneTask):
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


class WordInContextTask(_FinetuneTask):
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
