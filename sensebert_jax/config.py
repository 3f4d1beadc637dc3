"""SenseBertConfig: BERT's hyper-parameters (transformers' BertConfig names) plus the supersense
vocabulary; presets tiny / base (768) / large (1024)."""

from __future__ import annotations

import dataclasses

from common.config import ModelConfigBase
from common.errors import UserError
from common.layers import ACTIVATIONS
from sensebert_jax.supersenses import NUM_SUPERSENSES


class SenseBertConfigError(UserError):
    """A SenseBertConfig field has a value the model cannot be built with."""


@dataclasses.dataclass(frozen=True)
class SenseBertConfig(ModelConfigBase):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    num_supersenses: int = NUM_SUPERSENSES
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype

    error = SenseBertConfigError

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "num_supersenses"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise SenseBertConfigError(f"SenseBertConfig.{f}={v!r}: must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise SenseBertConfigError(f"SenseBertConfig.num_attention_heads={self.num_attention_heads}: must divide "
                                       f"hidden_size ({self.hidden_size})")
        for f in ("hidden_dropout_prob",):  # also on the attention output (not its probabilities)
            if not 0 <= getattr(self, f) < 1:
                raise SenseBertConfigError(f"SenseBertConfig.{f}={getattr(self, f)!r}: must lie in [0, 1)")
        self.check_dtypes()
        if self.hidden_act not in ACTIVATIONS:
            raise SenseBertConfigError(f"SenseBertConfig.hidden_act={self.hidden_act!r}: one of {tuple(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads



PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                 max_position_embeddings=128),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
