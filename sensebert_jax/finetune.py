"""The fine-tuning heads of SenseBERT and their data: WordNet's own example sentences (built by
data/build_sensebert_eval.py, split by lemma, so test lemmas are unseen in training).

  tagging  the tagged word's rightmost piece -> one of the 45 supersenses (SenseBertForTokenClassification)
  wic      [CLS] s1 [SEP] s2 [SEP] -> do the target words share a synset (SenseBertForWordInContext, from
           [CLS] and each target word's rightmost piece)

A head says which model it trains, how a row of its data becomes model inputs (`encode`), and how the
model's output becomes [batch, classes] logits (`logits`)."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from common.errors import UserError
from sensebert_jax.model import SenseBertForTokenClassification, SenseBertForWordInContext
from sensebert_jax.supersenses import NUM_SUPERSENSES, SUPERSENSES
from sensebert_jax.tokenizer import WordPieceTokenizer, pieces_with_target

EVAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sensebert_eval")


class FinetuneDataError(UserError):
    """Fine-tuning data that is missing or does not fit the configuration."""


def read_rows(name: str, split: str) -> list[dict]:
    """The rows of data/sensebert_eval/<name>.jsonl.gz in `split` ("train" or "test")."""
    path = os.path.join(EVAL_DIR, f"{name}.jsonl.gz")
    if not os.path.exists(path):
        raise FinetuneDataError(f"{path} is missing: run python -m data.build_sensebert_eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r["split"] == split]
    if not rows:
        raise FinetuneDataError(f"{path} holds no {split!r} rows")
    return rows


def padded_row(tok: WordPieceTokenizer, ids: list[int], types: list[int], seq_len: int) -> dict:
    """Model inputs of one example, right-padded to seq_len (a longer example is an error, not cut)."""
    if len(ids) > seq_len:
        raise FinetuneDataError(f"an example has {len(ids)} pieces, more than config.seq_len={seq_len}")
    pad = seq_len - len(ids)
    return {"input_ids": np.asarray(ids + [tok.pad_id] * pad, np.int32),
            "attention_mask": np.asarray([1] * len(ids) + [0] * pad, np.int32),
            "token_type_ids": np.asarray(types + [0] * pad, np.int32), "weight": np.float32(1.0)}


def _encode_tagging(tok, row, seq_len):
    pieces, t = pieces_with_target(tok, row["text"], row["start"], row["end"])
    out = padded_row(tok, [tok.cls_id] + pieces + [tok.sep_id], [0] * (len(pieces) + 2), seq_len)
    out.update(position=np.int32(t + 1), label=np.int32(row["supersense"]))
    return out


def _encode_wic(tok, row, seq_len):
    p1, t1 = pieces_with_target(tok, row["text1"], row["start1"], row["end1"])
    p2, t2 = pieces_with_target(tok, row["text2"], row["start2"], row["end2"])
    ids = [tok.cls_id] + p1 + [tok.sep_id] + p2 + [tok.sep_id]
    out = padded_row(tok, ids, [0] * (len(p1) + 2) + [1] * (len(p2) + 1), seq_len)
    out.update(targets=np.asarray([t1 + 1, len(p1) + 2 + t2], np.int32), label=np.int32(row["label"]))
    return out


@dataclasses.dataclass(frozen=True)
class Head:
    data_name: str  # data/sensebert_eval/<data_name>.jsonl.gz
    model: Callable  # cfg -> the Linen model
    encode: Callable  # (tokenizer, row, seq_len) -> model inputs and "label"
    logits: Callable  # (apply(*extra inputs), batch) -> [batch, classes] float32
    init_inputs: tuple  # dummy extra inputs for init, after (ids, mask, types, M)
    label_of: Callable  # row -> its label
    label_name: Callable  # label -> a readable name


HEADS = {
    "tagging": Head("tagging", lambda cfg: SenseBertForTokenClassification(cfg, NUM_SUPERSENSES), _encode_tagging,
                    lambda apply, batch: jnp.take_along_axis(apply(), batch["position"][:, None, None], axis=1)[:, 0],
                    (), lambda r: r["supersense"], lambda i: SUPERSENSES[i]),
    "wic": Head("wic", SenseBertForWordInContext, _encode_wic, lambda apply, batch: apply(batch["targets"]),
                (jnp.zeros((1, 2), jnp.int32),), lambda r: r["label"],
                lambda i: "same sense" if i else "different sense"),
}


def majority_baseline(head: Head, max_rows: int | None = None) -> tuple[str, float]:
    """(the most frequent training label, its accuracy on the (first max_rows) test rows)."""
    label = collections.Counter(head.label_of(r) for r in read_rows(head.data_name, "train")).most_common(1)[0][0]
    test = read_rows(head.data_name, "test")[:max_rows]
    return head.label_name(label), sum(head.label_of(r) == label for r in test) / len(test)
