"""Auxiliary tuning: a frozen causal LM steered by a small trained model whose logits are added to
its own (Zeldes et al. 2020, arXiv 2006.16823)."""

from aux_tuning.frozen_lm import load_frozen_lm
from aux_tuning.keywords import (
    KeywordError,
    contains_keywords,
    content_words,
    held_out_keywords,
    keyword_block,
    keyword_documents,
    keyword_rates,
    keyword_tokens,
    sample_keywords,
)
from aux_tuning.model import AuxOutput, AuxTunedLM, AuxTuningError

__all__ = ["AuxOutput", "AuxTunedLM", "AuxTuningError", "KeywordError", "contains_keywords", "content_words",
           "held_out_keywords", "keyword_block", "keyword_documents", "keyword_rates", "keyword_tokens",
           "load_frozen_lm", "sample_keywords"]
