"""SenseBERT (Levine et al., ACL 2020) in JAX + Flax: BERT pre-trained to predict the WordNet
supersense of masked words beside the words themselves."""

from sensebert_jax.config import PRESETS, SenseBertConfig, SenseBertConfigError
from sensebert_jax.supersenses import NUM_SUPERSENSES, SUPERSENSES, allowed_ids, allowed_supersenses
from sensebert_jax.tokenizer import TokenizerError, WordPieceTokenizer, token_supersense_matrix

__all__ = [
    "NUM_SUPERSENSES", "PRESETS", "SUPERSENSES", "SenseBertConfig", "SenseBertConfigError", "TokenizerError",
    "WordPieceTokenizer", "allowed_ids", "allowed_supersenses", "token_supersense_matrix",
]
