"""Jamba's attention and dense MLP (transformers' modeling_jamba.py, operation for operation, so
float32 logits agree to 1e-4), and the config-bound constructors of the shared leaf layers.

Shape suffixes: see the legend in `common.layers` (B batch, L queries, S keys, E hidden, H kv
heads, G query heads per kv head, D head dim, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax

from common.attention import AttentionMask, attention, cached_attention, kv_store
from common.layers import Dense, RMSNorm, activation, normal_init
from jamba_jax.config import JambaConfig


def dense(cfg: JambaConfig, features: int | Sequence[int], axes, name: str, use_bias: bool = False, **kw) -> Dense:
    """A Dense in the config's dtypes and initialiser."""
    return Dense(features, axes, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, use_bias=use_bias,
                 kernel_init=kw.pop("kernel_init", normal_init(cfg.initializer_range)), name=name,
                 lora_dropout=cfg.lora_dropout, **kw)


def rms_norm(cfg: JambaConfig, name: str, axis_name: str | None = "norm") -> RMSNorm:
    return RMSNorm(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
                   axis_name=axis_name, name=name)


class KVCache(NamedTuple):
    """An attention layer's cache: keys and values of every slot written so far, each a
    `common.attention.kv_store` store (an array of the cache dtype, or int8 values with their scales)."""

    k: jax.Array | kv_store.Int8KV  # [B, H, S, D] (heads-major: what the attention reads, one head's keys contiguous)
    v: jax.Array | kv_store.Int8KV  # [B, H, S, D]


class Attention(nn.Module):
    """Causal grouped-query attention with no positional embedding (the Jamba paper's choice).

    With `kv_cache` (a KVCache of `max_length` slots), the chunk's keys and values are written at
    `index` and the queries attend over the whole cache (the mask says which slots are real and
    causal); returns (y, updated cache). Without it, returns (y, None).
    """

    cfg: JambaConfig

    @staticmethod
    def init_cache(cfg: JambaConfig, batch: int, max_length: int, dtype) -> KVCache:
        shape = (batch, cfg.num_key_value_heads, max_length, cfg.head_dim)
        return KVCache(kv_store.empty(shape, dtype), kv_store.empty(shape, dtype))

    @nn.compact
    def __call__(self, x_BxLxE, mask: AttentionMask, kv_cache=None, index=None):
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, length, _ = x_BxLxE.shape
        q = dense(cfg, nh * hd, ("embed", "q_heads"), "q_proj")(x_BxLxE)
        k = dense(cfg, nkv * hd, ("embed", "kv_heads"), "k_proj")(x_BxLxE)
        v = dense(cfg, nkv * hd, ("embed", "kv_heads"), "v_proj")(x_BxLxE)
        groups = nh // nkv
        q_BxLxHxGxD = q.reshape(b, length, nkv, groups, hd)
        k_BxHxLxD = k.reshape(b, length, nkv, hd).transpose(0, 2, 1, 3)
        v_BxHxLxD = v.reshape(b, length, nkv, hd).transpose(0, 2, 1, 3)
        if kv_cache is None:
            new_cache = None
            out_BxLxHxGxD = attention(q_BxLxHxGxD, k_BxHxLxD, v_BxHxLxD, mask, impl=cfg.attention_impl)
        else:
            out_BxLxHxGxD, k_cache, v_cache = cached_attention(q_BxLxHxGxD, k_BxHxLxD, v_BxHxLxD, kv_cache.k,
                                                               kv_cache.v, index, mask, impl=cfg.attention_impl)
            new_cache = KVCache(k_cache, v_cache)
        out = out_BxLxHxGxD.astype(cfg.compute_dtype).reshape(b, length, nh * hd)
        return dense(cfg, cfg.hidden_size, ("q_heads", "embed"), "o_proj")(out), new_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    cfg: JambaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj")(activation(cfg.hidden_act)(gate) * up)
