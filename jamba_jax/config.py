"""JambaConfig: the fields, names and defaults of transformers' `JambaConfig`, plus ours.

The HF fields keep their exact names and defaults so that a Hub `config.json` maps one to one
(`from_hf_dict` / `to_hf_dict`); those marked "no effect" are kept only for that round trip (they
choose PyTorch kernels, caching or dropout that this implementation does not have). Our additions are
the numerics and execution knobs: `dtype` (compute), `param_dtype`, `scan_impl` (see
`kernels.selective_scan`), `attention_impl` (see `common.attention`), `moe_impl` (see
`kernels.grouped_matmul`), `remat_policy` (see `jamba_jax.remat`), `scan_layers` (see
`jamba_jax.layout`), `moe_capacity_factor` (see `jamba_jax.expert_parallel`) and `kv_cache_dtype` (see
`common.attention.kv_store`); none of them changes the weights.

The layer schedule (Jamba paper, section 2): layer i is attention when
`i % attn_layer_period == attn_layer_offset`, otherwise Mamba; its feed-forward is a
mixture of experts when `i % expert_layer_period == expert_layer_offset`, otherwise a dense MLP.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from common.attention import ATTENTION_IMPLS
from common.attention.kv_store import KV_CACHE_DTYPES
from common.config import DTYPES, ModelConfigBase
from common.errors import UserError
from common.layers import ACTIVATIONS
from kernels import IMPLS
from kernels.grouped_matmul import FFN_IMPLS

_SCAN_IMPLS = ("auto",) + IMPLS
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_and_moe_outputs")  # see jamba_jax.remat
# fields that do not change the weights: a fine-tuning run or a generator may set them freely
EXECUTION_FIELDS = ("dtype", "scan_impl", "attention_impl", "moe_impl", "remat_policy", "scan_layers",
                    "moe_capacity_factor", "lora_dropout", "kv_cache_dtype")
WEIGHT_NEUTRAL_FIELDS = EXECUTION_FIELDS + ("param_dtype",)  # ... and the storage dtype, a cast

# Keys that transformers writes into every config.json (PretrainedConfig bookkeeping) or that
# older Jamba checkpoints carry; they do not describe the architecture and are ignored on load.
_HF_IGNORED_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "_attn_implementation", "_attn_implementation_autoset", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_return_dict", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "pruned_heads",
    "finetuning_task", "num_labels", "quantization_config", "calc_logits_for_entire_prompt",
    "num_logits_to_keep", "n_ctx", "sliding_window", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "diversity_penalty", "num_beam_groups",
    "encoder_no_repeat_ngram_size", "tf_legacy_loss", "use_bfloat16",
})


class ConfigError(UserError):
    """A config field has a value the model cannot be built with."""


@dataclasses.dataclass(frozen=True)
class JambaConfig(ModelConfigBase):
    # --- transformers' JambaConfig, same names and defaults -----------------------------------
    vocab_size: int = 65536
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True  # no effect (the cache is what prefill / decode take)
    output_router_logits: bool = False  # no effect (router logits are always returned)
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    max_position_embeddings: int = 262144  # no effect (no positional embedding; caches are sized by the caller)
    attention_dropout: float = 0.0  # no effect (no dropout)
    num_experts_per_tok: int = 2
    num_experts: int = 16
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    use_mamba_kernels: bool = True  # no effect (scan_impl chooses the scan)
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    use_mambapy: bool = False  # no effect (scan_impl chooses the scan)
    use_associative_scan: bool = True  # no effect (scan_impl chooses the scan)
    # --- ours -----------------------------------------------------------------------------------
    dtype: str = "float32"  # compute dtype of matmuls and activations (bfloat16 on accelerators)
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_impl: str = "auto"  # selective-scan implementation, see kernels.selective_scan
    attention_impl: str = "auto"  # attention implementation, see common.attention.attention
    moe_impl: str = "auto"  # the experts' grouped matmul, see kernels.grouped_matmul
    remat_policy: str = "none"  # what a decoder layer keeps for the backward pass, see jamba_jax.remat
    scan_layers: bool = False  # the stack as one nn.scan over repeats of the layer cycle (jamba_jax.layout)
    lora_dropout: float = 0.0  # dropout on the input of LoRA adapters in training (jamba_jax.lora)
    moe_capacity_factor: float = 0.0  # 0 = dropless; else slots per device pair under expert parallelism
    # (expert_parallel), per expert elsewhere (grouped_ffn.expert_capacity): pairs past it add nothing
    kv_cache_dtype: str | None = None  # the attention layers' KV cache: None = the compute dtype; float32,
    # bfloat16 or int8 (a float32 scale per position and head, common.attention.kv_store)

    error = ConfigError

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.mamba_dt_rank == "auto":
            set_("mamba_dt_rank", math.ceil(self.hidden_size / 16))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        self._validate()

    def _validate(self):
        def need(cond, field, msg):
            if not cond:
                raise ConfigError(f"JambaConfig.{field}={getattr(self, field)!r}: {msg}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "num_experts", "num_experts_per_tok",
                  "expert_layer_period", "attn_layer_period", "mamba_d_state", "mamba_d_conv",
                  "mamba_expand", "mamba_dt_rank"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f,
                 "must be a positive integer")
        need(0 <= self.attn_layer_offset < self.attn_layer_period, "attn_layer_offset",
             f"must satisfy 0 <= offset < attn_layer_period ({self.attn_layer_period})")
        need(0 <= self.expert_layer_offset < self.expert_layer_period, "expert_layer_offset",
             f"must satisfy 0 <= offset < expert_layer_period ({self.expert_layer_period})")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"must divide hidden_size ({self.hidden_size})")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads ({self.num_attention_heads})")
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"must be at most num_experts ({self.num_experts})")
        need(self.hidden_act in ACTIVATIONS, "hidden_act", f"must be one of {tuple(ACTIVATIONS)}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
        need(self.scan_impl in _SCAN_IMPLS, "scan_impl", f"must be one of {_SCAN_IMPLS}")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"must be one of {ATTENTION_IMPLS}")
        need(self.moe_impl in FFN_IMPLS, "moe_impl", f"must be one of {FFN_IMPLS}")
        need(self.kv_cache_dtype in (None,) + KV_CACHE_DTYPES, "kv_cache_dtype",
             f"must be None (the compute dtype) or one of {KV_CACHE_DTYPES}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy", f"must be one of {REMAT_POLICIES}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.moe_capacity_factor >= 0, "moe_capacity_factor", "must be 0 (dropless) or positive")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must lie in [0, 1)")
        need(not self.scan_layers or self.num_hidden_layers % self.layer_cycle == 0, "scan_layers",
             f"needs num_hidden_layers ({self.num_hidden_layers}) to be a multiple of the layer cycle "
             f"({self.layer_cycle}: the attention and expert periods' least common multiple)")
        for f in ("pad_token_id", "bos_token_id"):
            v = getattr(self, f)
            need(v is None or 0 <= v < self.vocab_size, f, f"must lie in [0, vocab_size={self.vocab_size})")

    # --- derived sizes ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    # --- layer schedule --------------------------------------------------------------------------
    @property
    def layer_cycle(self) -> int:
        """Layers after which the schedule repeats: lcm of the attention and expert periods."""
        return math.lcm(self.attn_layer_period, self.expert_layer_period if self.num_experts > 1 else 1)

    def is_attention_layer(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    @property
    def layers_block_type(self) -> list[str]:
        """'attention' or 'mamba' per layer, as transformers names them."""
        return ["attention" if self.is_attention_layer(i) else "mamba" for i in range(self.num_hidden_layers)]

    @property
    def layers_num_experts(self) -> list[int]:
        """Number of experts per layer (1 means a dense MLP), as transformers names it."""
        return [self.num_experts if self.is_moe_layer(i) else 1 for i in range(self.num_hidden_layers)]

    # --- conversion --------------------------------------------------------------------------------
    @classmethod
    def hf_field_names(cls) -> tuple[str, ...]:
        ours = set(EXECUTION_FIELDS) | {"param_dtype"}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ours)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JambaConfig:
        """As `ModelConfigBase.from_dict`; a saved config's `remat` (the boolean that `remat_policy`
        replaced) reads as "full" or "none"."""
        d = dict(d)
        if "remat" in d:
            remat = d.pop("remat")
            d.setdefault("remat_policy", "full" if remat else "none")
        return super().from_dict(d)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> JambaConfig:
        """Builds a config from a transformers `config.json` dict; `overrides` set our own fields."""
        model_type = d.get("model_type")
        if model_type != "jamba":
            raise ConfigError(f"config.json has model_type={model_type!r}, expected 'jamba'")
        d = dict(d)
        if "num_local_experts" in d:  # transformers' attribute_map alias
            d.setdefault("num_experts", d.pop("num_local_experts"))
        names = set(cls.hf_field_names())
        unknown = sorted(k for k in d if k not in names and k not in _HF_IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"config.json has fields JambaConfig does not know: {unknown}")
        kwargs = {k: v for k, v in d.items() if k in names}
        return cls(**kwargs, **overrides)

    def weight_neutral(self) -> dict[str, Any]:
        """The fields that do not change the weights (WEIGHT_NEUTRAL_FIELDS) and their values."""
        return {k: getattr(self, k) for k in WEIGHT_NEUTRAL_FIELDS}

    def with_weight_neutral(self, fields: dict[str, Any]) -> JambaConfig:
        """This config with the fields of `fields` that do not change the weights taken from it (a fine-tuning
        run's: the checkpoint gives the architecture, the run its numerics and execution)."""
        return self.replace(**{k: v for k, v in fields.items() if k in WEIGHT_NEUTRAL_FIELDS})

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dict transformers' JambaConfig reads."""
        d = {name: getattr(self, name) for name in self.hf_field_names()}
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["model_type"] = "jamba"
        d["architectures"] = ["JambaForCausalLM"]
        d["dtype"] = self.param_dtype
        return d
