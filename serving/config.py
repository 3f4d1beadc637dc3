"""The engine's settings, and the start-up pre-flight that holds them against a device's memory (weights, the
slot cache, one step's activations) and refuses, in one line with the figures, what cannot fit."""

from __future__ import annotations

import dataclasses

import jax

from common.attention.kv_store import KV_CACHE_DTYPES
from common.errors import UserError
from common.memory import GIB, device_memory_bytes, tree_bytes
from jamba_jax.params import forward_bytes_per_token
from serving.slots import init_slots


class EngineConfigError(UserError):
    """Engine settings that cannot work (sizes, or slots x length that cannot fit the device)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 8  # slots: sequences decoded together
    max_model_len: int = 2048  # tokens per slot (prompt + output)
    max_num_batched_tokens: int = 512  # tokens per step: decoding slots + prompt pieces
    prefill_chunk: int = 256  # the longest prompt piece (a power of two)
    decode_steps: int = 8  # decode steps per device call (tokens reach the host, and requests join, between calls)
    max_queue: int = 1024  # waiting requests beyond which new ones are refused
    cache_dtype: str | None = None  # KV cache dtype: float32, bfloat16, int8 (None: the model's kv_cache_dtype or
    # compute dtype)

    def check(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "prefill_chunk", "max_queue",
                     "decode_steps"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.prefill_chunk & (self.prefill_chunk - 1):
            raise EngineConfigError(f"prefill_chunk={self.prefill_chunk} must be a power of two")
        if self.cache_dtype not in (None,) + KV_CACHE_DTYPES:
            raise EngineConfigError(f"cache_dtype={self.cache_dtype!r} must be one of {KV_CACHE_DTYPES}")


def memory_needed(cfg, params, config: EngineConfig, param_shardings=None, cache_shardings=None) -> dict[str, int]:
    """Bytes the engine holds on a device: weights, the slot cache and the staged prompts' (`serving.staging`:
    up to max_num_seqs rows of a chunk), logits, one step's activations (the weights and the slot cache as
    sharded, when they are)."""
    weights = tree_bytes(params, param_shardings)
    cache = jax.eval_shape(lambda: init_slots(cfg, config.max_num_seqs, config.max_model_len, config.cache_dtype))[0]
    staged = jax.eval_shape(lambda: init_slots(cfg, config.max_num_seqs, config.prefill_chunk, config.cache_dtype))
    cache = tree_bytes(cache, cache_shardings) + tree_bytes(staged)
    per_token = forward_bytes_per_token(cfg)
    steps = per_token * (config.prefill_chunk + config.max_num_seqs) + 2 * config.max_num_seqs * cfg.vocab_size * 4
    return {"weights": weights, "cache": cache, "activations": steps, "total": weights + cache + steps}


def check_memory(need: dict[str, int], config: EngineConfig) -> dict[str, int]:
    """Refuses (EngineConfigError) settings whose cache and weights cannot fit a device, in one line."""
    limit, where = device_memory_bytes()
    if need["total"] > 0.9 * limit:
        raise EngineConfigError(
            f"max_num_seqs={config.max_num_seqs} x max_model_len={config.max_model_len} needs about "
            f"{need['total'] / GIB:,.1f} GiB (weights {need['weights'] / GIB:,.1f} + KV and Mamba cache "
            f"{need['cache'] / GIB:,.1f} + activations {need['activations'] / GIB:,.1f}) but a device holds "
            f"{limit / GIB:,.1f} GiB ({where}); lower --config.max_num_seqs or --config.max_model_len")
    return need
