"""Jamba: the hybrid Transformer-Mamba MoE language model (arXiv 2403.19887) as Flax Linen modules.

Pre-norm decoder layers, each either attention or Mamba, each followed by a dense SwiGLU MLP or a
mixture of experts (the schedule lives in `JambaConfig`); a final RMSNorm and an untied LM head.
Parameter names mirror transformers' module tree (`model/layers_3/mamba/...`) so the HF conversion
is a table; with `scan_layers` the stack is one `nn.scan` over repeats of the layer cycle
(`jamba_jax.layout`).

`JambaForCausalLM`'s entry points each say what they compute (`model.apply(variables, ...,
method=...)`):

  __call__    logits [B, L, V] of every position                                  -> JambaOutput
  token_nll   -log p(targets) [B, L] a chunk of positions at a time, no logits   -> LossOutput
  hidden      the final hidden states [B, L, E] and the LM head [E, V]            -> HiddenOutput
  prefill     a chunk of a prompt into a HybridCache; the last position's logits  -> StepOutput
  decode      one token per row into a HybridCache; its logits                    -> StepOutput
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
from jamba_jax.cache import HybridCache, init_cache
from jamba_jax.config import JambaConfig
from jamba_jax.layers import MLP, Attention, rms_norm
from jamba_jax.layout import CYCLES, repeats
from jamba_jax.mamba import MambaMixer
from jamba_jax.moe import SparseMoE, load_balancing_loss
from jamba_jax.remat import remat_layer


class TokenIdError(UserError):
    """Token ids outside [0, vocab_size)."""


@flax.struct.dataclass
class JambaOutput:
    logits: jax.Array  # [B, L, V]
    router_logits: tuple  # one [B, L, X] per MoE layer, in layer order
    aux_loss: jax.Array  # scalar: Switch load-balancing loss (not yet scaled by router_aux_loss_coef)


@flax.struct.dataclass
class LossOutput:
    token_nll: jax.Array  # [B, L] float32: -log p(targets[b, t] | positions <= t)
    router_logits: tuple
    aux_loss: jax.Array


@flax.struct.dataclass
class HiddenOutput:
    hidden: jax.Array  # [B, L, E] after the final norm: logits = hidden @ head
    head: jax.Array  # [E, V] the LM head (the embedding's transpose when tied), compute dtype
    router_logits: tuple
    aux_loss: jax.Array


@flax.struct.dataclass
class StepOutput:
    logits: jax.Array  # [B, V] of the step's last position
    cache: HybridCache  # the cache with the step's tokens written


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


def run_layers(cfg: JambaConfig, layer_ids, h, valid_BxL, mask, segment_ids_BxL, caches, index):
    """The decoder layers `layer_ids` in order, created in the calling compact module as layers_{i}:
    (h, router logits of the MoE layers in order, the layers' new caches or None). Both layouts run
    this: the unrolled stack over every layer, the scanned cycle over its positions."""
    layer_cls = remat_layer(DecoderLayer, cfg)
    router_logits, new_caches = [], []
    for j, i in enumerate(layer_ids):
        h, rl, cache = layer_cls(cfg, i, name=f"layers_{i}")(h, valid_BxL, mask, segment_ids_BxL,
                                                             None if caches is None else caches[j], index)
        h = constrain(h, ("batch", "length", None))
        new_caches.append(cache)
        if rl is not None:
            router_logits.append(rl)
    return h, tuple(router_logits), None if caches is None else tuple(new_caches)


class DecoderCycle(nn.Module):
    """`layer_cycle` consecutive decoder layers: the body that `scan_layers` scans over the repeats.
    Carry: the hidden state; scanned in: the cycle's layer caches; scanned out: its router logits
    (one per MoE position) and updated caches."""

    cfg: JambaConfig

    @nn.compact
    def __call__(self, h, valid_BxL, mask, segment_ids_BxL, caches, index):
        h, router_logits, new_caches = run_layers(self.cfg, range(self.cfg.layer_cycle), h, valid_BxL, mask,
                                                  segment_ids_BxL, caches, index)
        return h, (router_logits, new_caches)


class JambaModel(nn.Module):
    """Embedding, decoder layers, final norm.

    Returns (hidden [B, L, E], router logits in layer order, per-layer caches or None; scanned: per
    cycle position, stacked over the repeats).
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
        # the table whole along `embed` (ZeRO-3 gathers it, as for every weight) so the looked-up rows come out
        # split like the tokens, not along `embed` (which XLA could only undo by replicating [B, L, E])
        table_VxE = constrain(embed.embedding, ("vocab", None)).astype(cfg.compute_dtype)
        h = jnp.take(table_VxE, input_ids, axis=0)
        if embed_offsets_BxLxE is not None:  # features added to the token embeddings (auxiliary tuning)
            h = h + embed_offsets_BxLxE.astype(h.dtype)
        h = constrain(h, ("batch", "length", None))
        if cfg.scan_layers:
            stack = nn.scan(DecoderCycle, variable_axes={"params": 0, "intermediates": 0, "hidden_states": 0},
                            split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                            length=repeats(cfg), metadata_params={nn.PARTITION_NAME: "layers"})
            h, (stacked_logits, new_caches) = stack(cfg, name=CYCLES)(h, valid_BxL, mask, segment_ids, layer_caches,
                                                                      index)
            # [repeats, ...] per MoE position -> one array per MoE layer, in layer order
            router_logits = tuple(logits[r] for r in range(repeats(cfg)) for logits in stacked_logits)
        else:
            h, router_logits, new_caches = run_layers(cfg, range(cfg.num_hidden_layers), h, valid_BxL, mask,
                                                      segment_ids, layer_caches, index)
        return rms_norm(cfg, "final_layernorm")(h), router_logits, new_caches


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
    """The causal LM; its entry points are listed in the module docstring. Their arguments:

    input_ids: [B, L] token ids. attention_mask: [B, L], 1 for real tokens, 0 for padding (left
    padding for batches). segment_ids: [B, L] document ids of packed rows (0 = padding); attention
    stays inside a document and the Mamba state restarts at each document's first token.
    embed_offsets: [B, L, E] added to the token embeddings (features from another model: auxiliary
    tuning reads a frozen LM's hidden states this way). cache: a `HybridCache` (`init_cache`); the
    tokens continue from it at position cache.index.
    """

    cfg: JambaConfig

    def init_cache(self, batch: int, max_length: int, dtype=None) -> HybridCache:
        """An empty hybrid cache for this model (`jamba_jax.cache.init_cache`)."""
        return init_cache(self.cfg, batch, max_length, dtype)

    @nn.compact
    def _forward(self, input_ids, valid_BxL, mask, segment_ids, layer_caches, index, embed_offsets):
        """(final hidden [B, L, E], head [E, V] in the compute dtype, router logits, new layer caches)."""
        cfg = self.cfg
        hidden, router_logits, new_layers = JambaModel(cfg, name="model")(
            input_ids, valid_BxL, mask, segment_ids, layer_caches, index, embed_offsets)
        if cfg.tie_word_embeddings:
            head_ExV = nn.unbox(self.variables["params"]["model"]["embed_tokens"]["embedding"]).astype(
                cfg.compute_dtype).T
        else:
            kernel = self.param("lm_head", nn.with_logical_partitioning(normal_init(cfg.initializer_range),
                                                                        ("embed", "vocab")),
                                (cfg.hidden_size, cfg.vocab_size), cfg.weights_dtype)
            head_ExV = kernel.astype(cfg.compute_dtype)
        return hidden, head_ExV, router_logits, new_layers

    def hidden(self, input_ids, attention_mask=None, segment_ids=None, embed_offsets=None) -> HiddenOutput:
        """The final hidden states and the LM head of whole rows (no cache)."""
        check_token_ids(input_ids, self.cfg.vocab_size)
        if attention_mask is None:
            valid = jnp.ones(input_ids.shape, bool) if segment_ids is None else segment_ids != 0
        else:
            valid = attention_mask.astype(bool)
        hidden, head, router_logits, _ = self._forward(input_ids, valid, AttentionMask.causal(valid, segment_ids),
                                                       segment_ids, None, None, embed_offsets)
        aux = load_balancing_loss(router_logits, self.cfg.num_experts, self.cfg.num_experts_per_tok,
                                  None if attention_mask is None and segment_ids is None else valid)
        return HiddenOutput(hidden, head, router_logits, aux)

    def __call__(self, input_ids, attention_mask=None, segment_ids=None, embed_offsets=None) -> JambaOutput:
        """Logits [B, L, V] of every position (whole rows, no cache)."""
        out = self.hidden(input_ids, attention_mask, segment_ids, embed_offsets)
        return JambaOutput(out.hidden @ out.head, out.router_logits, out.aux_loss)

    def token_nll(self, input_ids, targets, attention_mask=None, segment_ids=None, embed_offsets=None) -> LossOutput:
        """-log p(targets[b, t] | positions <= t) [B, L] float32, a chunk of positions at a time
        (`common.losses.chunked_token_nll`): training and evaluation never hold [B, L, V] logits."""
        out = self.hidden(input_ids, attention_mask, segment_ids, embed_offsets)
        return LossOutput(chunked_token_nll(out.hidden, out.head, targets), out.router_logits, out.aux_loss)

    def prefill(self, input_ids, cache: HybridCache, attention_mask=None, embed_offsets=None) -> StepOutput:
        """Runs a chunk of tokens [B, L] into `cache` at cache.index (the prompt, or a part of it):
        the last position's logits [B, V] and the updated cache."""
        check_token_ids(input_ids, self.cfg.vocab_size)
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        if jnp.ndim(cache.index) == 1:  # a position per row (serving slots): one token each, decode only
            if input_ids.shape[1] != 1:
                raise ValueError(f"a cache with a position per row takes one token per row, got {input_ids.shape}")
            key_valid = cache.valid.at[jnp.arange(input_ids.shape[0]), cache.index].set(valid[:, 0], mode="drop")
            mask = AttentionMask(key_valid)  # a row's real keys all precede its new token
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
            mask = AttentionMask.cached(key_valid, cache.index, input_ids.shape[1])
        hidden, head, _, new_layers = self._forward(input_ids, valid, mask, None, cache.layers, cache.index,
                                                    embed_offsets)
        new_cache = HybridCache(cache.index + input_ids.shape[1], key_valid, new_layers)
        return StepOutput(hidden[:, -1] @ head, new_cache)

    def decode(self, token_ids_B, cache: HybridCache, embed_offsets=None) -> StepOutput:
        """One new token per row ([B]) into `cache`: its logits [B, V] and the updated cache. The cache's
        index may be one position per row ([B], each row at its own length: `serving`'s slots)."""
        return self.prefill(token_ids_B[:, None], cache, embed_offsets=embed_offsets)
