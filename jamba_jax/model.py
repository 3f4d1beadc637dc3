"""Jamba: the hybrid Transformer-Mamba MoE language model (arXiv 2403.19887) as Flax Linen modules.

Pre-norm decoder layers, each either attention or Mamba, each followed by a dense SwiGLU MLP or a
mixture of experts (the schedule lives in `JambaConfig`); a final RMSNorm and an untied LM head.
Parameter names mirror transformers' module tree (`model/layers_3/mamba/...`) so the HF conversion
is a table; with `scan_layers` the stack is one `nn.scan` over repeats of the layer cycle
(`jamba_jax.layout`).
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.attention import AttentionMask
from common.errors import UserError
from common.layers import normal_init
from common.losses import chunked_token_nll
from common.sharding import constrain
from jamba_jax.cache import init_cache
from jamba_jax.config import JambaConfig
from jamba_jax.layers import MLP, Attention, rms_norm
from jamba_jax.layout import CYCLES, repeats
from jamba_jax.mamba import MambaMixer
from jamba_jax.moe import SparseMoE, load_balancing_loss


class TokenIdError(UserError):
    """Token ids outside [0, vocab_size)."""


@flax.struct.dataclass
class JambaOutput:
    logits: jax.Array | None  # [batch, length, vocab] (None when the call was given `targets`)
    router_logits: tuple  # one [batch, length, num_experts] per MoE layer, in layer order
    aux_loss: jax.Array  # scalar: Switch load-balancing loss (not yet scaled by router_aux_loss_coef)
    cache: dict | None = None  # the updated hybrid cache when one was passed in (jamba_jax.cache)
    token_nll: jax.Array | None = None  # [batch, length] float32 -log p(targets) when the call was given `targets`


class DecoderLayer(nn.Module):
    cfg: JambaConfig
    layer_idx: int

    @nn.compact
    def __call__(self, h, valid_BxL, mask, segment_ids_BxL, layer_cache=None, index=None):
        cfg, i = self.cfg, self.layer_idx
        x = rms_norm(cfg, "input_layernorm")(h)
        if cfg.is_attention_layer(i):
            x, layer_cache = Attention(cfg, name="self_attn")(x, mask, layer_cache, index)
        else:
            x, layer_cache = MambaMixer(cfg, name="mamba")(x, valid_BxL, segment_ids_BxL, layer_cache)
        h = h + x
        x = rms_norm(cfg, "pre_ff_layernorm")(h)
        router_logits = None
        if cfg.is_moe_layer(i):
            x, router_logits = SparseMoE(cfg, name="feed_forward")(x)
        else:
            x = MLP(cfg, name="feed_forward")(x)
        h = h + x
        # Jamba-1.5's activation loss reads this (only when "intermediates" is mutable; free otherwise)
        self.sow("intermediates", "activation_mean_square", jnp.mean(jnp.square(h.astype(jnp.float32))))
        # the layer's output, for readers of a frozen model's features (when "hidden_states" is mutable)
        self.sow("hidden_states", "output", h)
        return h, router_logits, layer_cache


class DecoderCycle(nn.Module):
    """`layer_cycle` consecutive decoder layers: the body that `scan_layers` scans over the repeats.
    Carry: the hidden state; scanned in: the cycle's layer caches; scanned out: its router logits
    (one per MoE position) and updated caches."""

    cfg: JambaConfig

    @nn.compact
    def __call__(self, h, valid_BxL, mask, segment_ids_BxL, caches, index):
        cfg = self.cfg
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        router_logits, new_caches = [], []
        for j in range(cfg.layer_cycle):
            h, rl, cache = layer_cls(cfg, j, name=f"layers_{j}")(h, valid_BxL, mask, segment_ids_BxL,
                                                                 None if caches is None else caches[j], index)
            h = constrain(h, ("batch", None, None))
            new_caches.append(cache)
            if rl is not None:
                router_logits.append(rl)
        return h, (tuple(router_logits), None if caches is None else tuple(new_caches))


class JambaModel(nn.Module):
    """Embedding, decoder layers, final norm.

    Returns (hidden [batch, length, hidden], router logits in layer order, per-layer caches or None;
    scanned: per cycle position, stacked over the repeats).
    """

    cfg: JambaConfig

    @nn.compact
    def __call__(self, input_ids, valid_BxL, mask, segment_ids=None, layer_caches=None, index=None,
                 embed_offsets_BxLxE=None):
        cfg = self.cfg
        init = normal_init(cfg.initializer_range)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
                         embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
                         name="embed_tokens")
        h = embed(input_ids)
        if embed_offsets_BxLxE is not None:  # features added to the token embeddings (auxiliary tuning)
            h = h + embed_offsets_BxLxE.astype(h.dtype)
        h = constrain(h, ("batch", None, None))
        if cfg.scan_layers:
            stack = nn.scan(DecoderCycle, variable_axes={"params": 0, "intermediates": 0, "hidden_states": 0},
                            split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                            length=repeats(cfg), metadata_params={nn.PARTITION_NAME: "layers"})
            caches = None if layer_caches is None else tuple(layer_caches)
            h, (stacked_logits, new_caches) = stack(cfg, name=CYCLES)(h, valid_BxL, mask, segment_ids, caches,
                                                                      index)
            # [repeats, ...] per MoE position -> one array per MoE layer, in layer order
            router_logits = tuple(logits[r] for r in range(repeats(cfg)) for logits in stacked_logits)
            new_caches = None if new_caches is None else list(new_caches)
        else:
            layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
            router_logits, new_caches = [], []
            for i in range(cfg.num_hidden_layers):
                layer_cache = None if layer_caches is None else layer_caches[i]
                h, rl, layer_cache = layer_cls(cfg, i, name=f"layers_{i}")(h, valid_BxL, mask, segment_ids,
                                                                           layer_cache, index)
                h = constrain(h, ("batch", None, None))
                new_caches.append(layer_cache)
                if rl is not None:
                    router_logits.append(rl)
            router_logits, new_caches = tuple(router_logits), None if layer_caches is None else new_caches
        hidden = rms_norm(cfg, "final_layernorm")(h)
        return hidden, router_logits, new_caches


def check_token_ids(input_ids, vocab_size: int):
    """Raises TokenIdError for concrete ids outside [0, vocab_size). Traced ids cannot be checked
    here; the embedding lookup then yields NaN for them rather than silently clamping."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise TokenIdError(f"token ids must lie in [0, vocab_size={vocab_size}); got {sorted(set(bad.tolist()))[:10]}")


class JambaForCausalLM(nn.Module):
    """`apply({"params": p}, input_ids [batch, length], attention_mask=None)` -> JambaOutput.

    attention_mask: [batch, length], 1 for real tokens, 0 for padding (left padding for batches).
    segment_ids: optional [batch, length] document ids of packed rows (0 = padding); attention
    stays inside a document and the Mamba state restarts at each document's first token.
    cache: optional hybrid cache (`jamba_jax.cache.init_cache`); the tokens continue from it at
    position cache["index"] and the output carries the updated cache (prefill and decoding).
    embed_offsets: optional [batch, length, hidden] added to the token embeddings (features from
    another model: auxiliary tuning reads a frozen LM's hidden states this way).
    last_logits_only: logits [batch, 1, vocab] of the last position only (prefill).
    targets: optional [batch, length] token ids; then the output carries token_nll = -log p(targets[b, t] |
    positions <= t) instead of logits, computed a chunk of positions at a time (`common.losses.
    chunked_token_nll`): training and evaluation never hold [batch, length, vocab] logits.
    """

    cfg: JambaConfig

    def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
        """An empty hybrid cache for this model (`jamba_jax.cache.init_cache`)."""
        return init_cache(self.cfg, batch, max_length, dtype)

    @nn.compact
    def __call__(self, input_ids, attention_mask: jax.Array | None = None, segment_ids=None, cache=None,
                 embed_offsets=None, last_logits_only: bool = False, targets=None):
        cfg = self.cfg
        check_token_ids(input_ids, cfg.vocab_size)
        if targets is not None and last_logits_only:
            raise ValueError("targets (a loss over every position) and last_logits_only cannot be combined")
        if attention_mask is None:
            valid = jnp.ones(input_ids.shape, bool) if segment_ids is None else segment_ids != 0
        else:
            valid = attention_mask.astype(bool)
        if cache is None:
            mask, layer_caches, index, new_cache = AttentionMask.causal(valid, segment_ids), None, None, None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed rows) and a generation cache cannot be combined")
            index = cache["index"]
            key_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
            mask, layer_caches = AttentionMask.cached(key_valid, index, input_ids.shape[1]), cache["layers"]
        hidden, router_logits, new_layers = JambaModel(cfg, name="model")(
            input_ids, valid, mask, segment_ids, layer_caches, index, embed_offsets)
        if cache is not None:
            new_cache = {"index": index + input_ids.shape[1], "valid": key_valid, "layers": new_layers}
        if last_logits_only:
            hidden = hidden[:, -1:]
        if cfg.tie_word_embeddings:
            head_ExV = nn.unbox(self.variables["params"]["model"]["embed_tokens"]["embedding"]).astype(
                cfg.compute_dtype).T
        else:
            init = normal_init(cfg.initializer_range)
            kernel = self.param("lm_head", nn.with_logical_partitioning(init, ("embed", "vocab")),
                                (cfg.hidden_size, cfg.vocab_size), cfg.weights_dtype)
            head_ExV = kernel.astype(cfg.compute_dtype)
        aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                  None if attention_mask is None and segment_ids is None else valid)
        if targets is not None:
            return JambaOutput(logits=None, router_logits=router_logits, aux_loss=aux, cache=new_cache,
                               token_nll=chunked_token_nll(hidden, head_ExV, targets))
        return JambaOutput(logits=hidden @ head_ExV, router_logits=router_logits, aux_loss=aux, cache=new_cache)
