"""Auxiliary tuning: a frozen causal LM steered by a small trained model whose logits are added to
its own (Zeldes et al. 2020, arXiv 2006.16823)."""

from aux_tuning.model import AuxOutput, AuxTunedLM, AuxTuningError, keyword_block

__all__ = ["AuxOutput", "AuxTunedLM", "AuxTuningError", "keyword_block"]
