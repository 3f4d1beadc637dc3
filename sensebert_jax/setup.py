"""What every SenseBERT job builds first, from its config or from a pre-training run's metadata: the
WordPiece tokenizer (with its whole words), the model config on top of a preset, and the token ->
allowed-supersense matrix M of the input embedding (zeros for the plain-BERT baseline), plus the
model's init and apply over dict batches."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sensebert_jax.config import PRESETS, SenseBertConfig, SenseBertConfigError
from sensebert_jax.tokenizer import WordPieceTokenizer, load_whole_words, token_supersense_matrix


@dataclasses.dataclass(frozen=True, eq=False)
class SenseBertSetup:
    tokenizer: WordPieceTokenizer
    cfg: SenseBertConfig
    use_supersenses: bool  # False: plain BERT (M is zero: no supersense input term)
    supersense_matrix: jax.Array  # M [vocab, 45]
    vocab_file: str  # "" = the bundled vocabulary
    whole_words_file: str  # "" = none

    @classmethod
    def build(cls, cfg_fields: dict[str, Any], use_supersenses: bool, vocab_file: str = "",
              whole_words_file: str = "") -> SenseBertSetup:
        tokenizer = WordPieceTokenizer(vocab_file, load_whole_words(whole_words_file))
        m = token_supersense_matrix(tokenizer.vocab)
        cfg = SenseBertConfig.from_dict({**cfg_fields, "vocab_size": tokenizer.vocab_size})
        return cls(tokenizer, cfg, bool(use_supersenses), jnp.asarray(m if use_supersenses else np.zeros_like(m)),
                   vocab_file, whole_words_file)

    @classmethod
    def from_config(cls, config) -> SenseBertSetup:
        """From a training config's `sensebert` and `model` fields (`model.preset` + overrides; vocab_size
        -1 takes the tokenizer's)."""
        sb = config.sensebert
        fields = dict(config.model.to_dict())
        preset = fields.pop("preset", "tiny")
        if preset not in PRESETS:
            raise SenseBertConfigError(f"config.model.preset={preset!r}: one of {sorted(PRESETS)}")
        setup = cls.build({**PRESETS[preset], **fields}, sb.use_supersenses, sb.vocab_file,
                          sb.whole_words_file)
        vocab = fields.get("vocab_size", -1)
        if vocab not in (-1, setup.tokenizer.vocab_size):
            raise SenseBertConfigError(f"config.model.vocab_size={vocab} but the tokenizer has "
                                       f"{setup.tokenizer.vocab_size} tokens (-1 takes the tokenizer's)")
        return setup

    @classmethod
    def from_meta(cls, meta: dict) -> SenseBertSetup:
        """From the metadata a SenseBERT run records (`meta`)."""
        return cls.build(meta["model"], meta.get("use_supersenses", True), meta.get("vocab_file", ""),
                         meta.get("whole_words_file", ""))

    def meta(self, task: str) -> dict:
        """What a run records (and a resume must match)."""
        return {"task": task, "model": dataclasses.asdict(self.cfg), "use_supersenses": self.use_supersenses,
                "vocab_file": self.vocab_file, "whole_words_file": self.whole_words_file}

    def init(self, model, rng, *extra_inputs):
        """The model's boxed (logically partitioned) parameters; `extra_inputs` follow (ids, mask, types, M)
        in its call (e.g. WiC's target positions)."""
        ids = jnp.zeros((1, 8), jnp.int32)
        return model.init({"params": rng, "dropout": rng}, ids, jnp.ones_like(ids), jnp.zeros_like(ids),
                          self.supersense_matrix, *extra_inputs)["params"]

    def apply(self, model, params, batch: dict, rng, *extra_inputs):
        """The model on a batch {"input_ids", "attention_mask", optional "token_type_ids"}; dropout when rng
        is given."""
        ids = batch["input_ids"]
        types = batch.get("token_type_ids", jnp.zeros_like(ids))
        return model.apply({"params": params}, ids, batch["attention_mask"], types, self.supersense_matrix,
                           *extra_inputs, deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
