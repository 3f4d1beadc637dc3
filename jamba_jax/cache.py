"""The hybrid cache of Jamba generation: a KV cache per attention layer, a conv + SSM state per
Mamba layer (Jamba paper, section 2: only the few attention layers pay per-token memory).

`HybridCache` holds the position written up to, which slots hold real tokens, and one typed cache
per layer, each built by its own module: `Attention.init_cache` (a KVCache of k, v
[B, H, S, D]) or `MambaMixer.init_cache` (a MambaCache of the conv window [B, W-1, I] and the
float32 SSM state [B, I, N]); with `scan_layers`, one per position of the layer cycle, each stacked
over the repeats ([repeats, ...], as the scanned stack takes them). This module only assembles them.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jamba_jax.config import JambaConfig
from jamba_jax.layers import Attention
from jamba_jax.layout import layer_stacks, repeats
from jamba_jax.mamba import MambaMixer


@flax.struct.dataclass
class HybridCache:
    index: jax.Array  # int32 scalar: tokens written so far (the next token's position); or [B], one per row
    # (a serving engine's slots, each at its own length; decoding only: `JambaForCausalLM.decode`)
    valid: jax.Array  # bool [B, S]: slots holding real tokens (left padding and unwritten slots do not)
    layers: tuple  # per layer (scanned: per cycle position, stacked): a KVCache or a MambaCache

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


def init_cache(cfg: JambaConfig, batch: int, max_length: int, dtype=None) -> HybridCache:
    """An empty cache for `batch` rows of up to `max_length` tokens; KV in `dtype` (default: the config's
    `kv_cache_dtype`, else the compute dtype; int8 keeps a scale per position and head), SSM states always
    float32."""
    dtype = jnp.dtype(dtype or cfg.kv_cache_dtype or cfg.compute_dtype)

    def layer(i):
        if cfg.is_attention_layer(i):
            return Attention.init_cache(cfg, batch, max_length, dtype)
        return MambaMixer.init_cache(cfg, batch)

    layers = [layer(i) for _, i in layer_stacks(cfg)]
    if cfg.scan_layers:
        layers = [jax.tree.map(lambda x: jnp.zeros((repeats(cfg),) + x.shape, x.dtype), c) for c in layers]
    return HybridCache(jnp.zeros((), jnp.int32), jnp.zeros((batch, max_length), bool), tuple(layers))


def cache_bytes(cfg: JambaConfig, batch: int, length: int, dtype="bfloat16") -> dict[str, int]:
    """Bytes of the hybrid cache from the config alone: {"kv", "mamba", "total"}.

    KV: 2 (k and v) x batch x length x kv_heads x (head_dim x itemsize(dtype), + 4 for int8's float32 scale)
    per attention layer; Mamba: the conv window in the compute dtype and the float32 SSM state, independent of
    length.
    """
    item = np.dtype(jnp.dtype(dtype)).itemsize + (4 / cfg.head_dim if jnp.dtype(dtype) == jnp.int8 else 0)
    conv_item = np.dtype(cfg.compute_dtype).itemsize
    n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.num_hidden_layers))
    n_mamba = cfg.num_hidden_layers - n_attn
    kv = round(n_attn * 2 * batch * length * cfg.num_key_value_heads * cfg.head_dim * item)
    mamba = n_mamba * batch * cfg.mamba_d_inner * ((cfg.mamba_d_conv - 1) * conv_item + cfg.mamba_d_state * 4)
    return {"kv": kv, "mamba": mamba, "total": kv + mamba}
