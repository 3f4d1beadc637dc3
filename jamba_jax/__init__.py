"""Jamba / Jamba-1.5 in JAX + Flax: the hybrid Transformer-Mamba mixture-of-experts LM."""

from jamba_jax.cache import HybridCache, cache_bytes, init_cache
from jamba_jax.checkpoint import CheckpointSource, load_checkpoint, locate_checkpoint
from jamba_jax.config import ConfigError, JambaConfig
from jamba_jax.generation import GenerationError, check_generation_args, generate, prefill
from jamba_jax.hf_checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from jamba_jax.model import (
    HiddenOutput,
    JambaForCausalLM,
    JambaModel,
    JambaOutput,
    LossOutput,
    StepOutput,
    TokenIdError,
)
from jamba_jax.params import abstract_params, count_params, format_param_table, init_params
from jamba_jax.quantization import QuantizationError, quantize_experts_int8

__all__ = [
    "CheckpointError", "CheckpointSource", "ConfigError", "GenerationError", "HiddenOutput", "HybridCache",
    "JambaConfig", "JambaForCausalLM", "JambaModel", "JambaOutput", "LossOutput", "QuantizationError",
    "StepOutput", "TokenIdError", "abstract_params", "cache_bytes", "check_generation_args", "count_params",
    "format_param_table", "generate", "init_cache", "init_params", "load_checkpoint", "load_hf_checkpoint",
    "locate_checkpoint", "prefill", "quantize_experts_int8", "save_hf_checkpoint",
]
