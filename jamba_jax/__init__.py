"""Jamba / Jamba-1.5 in JAX + Flax: the hybrid Transformer-Mamba mixture-of-experts LM."""

from jamba_jax.cache import cache_bytes, init_cache
from jamba_jax.config import ConfigError, JambaConfig
from jamba_jax.generation import GenerationError, generate, prefill
from jamba_jax.hf_checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from jamba_jax.model import JambaForCausalLM, JambaModel, JambaOutput, TokenIdError
from jamba_jax.params import abstract_params, count_params, format_param_table, init_params
from jamba_jax.quantization import QuantizationError, quantize_experts_int8

__all__ = [
    "CheckpointError", "ConfigError", "GenerationError", "JambaConfig", "JambaForCausalLM", "JambaModel",
    "JambaOutput", "TokenIdError", "abstract_params", "cache_bytes", "count_params", "format_param_table",
    "generate", "init_cache", "init_params", "load_hf_checkpoint", "prefill", "save_hf_checkpoint",
    "QuantizationError", "quantize_experts_int8",
]
