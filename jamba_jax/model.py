"""Jamba: the hybrid Transformer-Mamba MoE language model (arXiv 2403.19887) as Flax Linen modules.

Pre-norm decoder layers, each either attention or Mamba, each followed by a dense SwiGLU MLP or a
mixture of experts (the schedule lives in `JambaConfig`); a final RMSNorm and an untied LM head.
Parameter names mirror transformers' module tree (`model/layers_3/mamba/...`) so the HF conversion
is a table.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jamba_jax.config import JambaConfig
from jamba_jax.layers import MLP, Attention, RMSNorm, attention_mask, normal_init
from jamba_jax.mamba import MambaMixer
from jamba_jax.moe import SparseMoE, load_balancing_loss


class TokenIdError(ValueError):
    """Token ids outside [0, vocab_size)."""


@flax.struct.dataclass
class JambaOutput:
    logits: jax.Array  # [batch, length, vocab]
    router_logits: tuple  # one [batch, length, num_experts] per MoE layer, in layer order
    aux_loss: jax.Array  # scalar: Switch load-balancing loss (not yet scaled by router_aux_loss_coef)


class DecoderLayer(nn.Module):
    cfg: JambaConfig
    layer_idx: int

    @nn.compact
    def __call__(self, h, valid_BxL, mask_BxQxK, segment_ids_BxL):
        cfg, i = self.cfg, self.layer_idx
        x = RMSNorm(cfg, name="input_layernorm")(h)
        if cfg.is_attention_layer(i):
            x = Attention(cfg, name="self_attn")(x, mask_BxQxK)
        else:
            x = MambaMixer(cfg, name="mamba")(x, valid_BxL, segment_ids_BxL)
        h = h + x
        x = RMSNorm(cfg, name="pre_ff_layernorm")(h)
        router_logits = None
        if cfg.is_moe_layer(i):
            x, router_logits = SparseMoE(cfg, name="feed_forward")(x)
        else:
            x = MLP(cfg, name="feed_forward")(x)
        h = h + x
        # Jamba-1.5's activation loss reads this (only when "intermediates" is mutable; free otherwise)
        self.sow("intermediates", "activation_mean_square", jnp.mean(jnp.square(h.astype(jnp.float32))))
        return h, router_logits


class JambaModel(nn.Module):
    """Embedding, decoder layers, final norm. Returns (hidden [batch, length, hidden], router logits)."""

    cfg: JambaConfig

    @nn.compact
    def __call__(self, input_ids, valid_BxL, segment_ids=None):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
                         embedding_init=nn.with_logical_partitioning(normal_init(cfg), ("vocab", "embed")),
                         name="embed_tokens")
        h = embed(input_ids)
        mask = attention_mask(valid_BxL, segment_ids)
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        router_logits = []
        for i in range(cfg.num_hidden_layers):
            h, rl = layer_cls(cfg, i, name=f"layers_{i}")(h, valid_BxL, mask, segment_ids)
            if rl is not None:
                router_logits.append(rl)
        return RMSNorm(cfg, name="final_layernorm")(h), tuple(router_logits)


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
    """

    cfg: JambaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask: jax.Array | None = None, segment_ids=None):
        cfg = self.cfg
        check_token_ids(input_ids, cfg.vocab_size)
        if attention_mask is None:
            valid = jnp.ones(input_ids.shape, bool) if segment_ids is None else segment_ids != 0
        else:
            valid = attention_mask.astype(bool)
        hidden, router_logits = JambaModel(cfg, name="model")(input_ids, valid, segment_ids)
        if cfg.tie_word_embeddings:
            table = nn.unbox(self.variables["params"]["model"]["embed_tokens"]["embedding"])
            logits = hidden @ table.astype(cfg.compute_dtype).T
        else:
            kernel = self.param("lm_head", nn.with_logical_partitioning(normal_init(cfg), ("embed", "vocab")),
                                (cfg.hidden_size, cfg.vocab_size), cfg.weights_dtype)
            logits = hidden @ kernel.astype(cfg.compute_dtype)
        aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                  None if attention_mask is None and segment_ids is None else valid)
        return JambaOutput(logits=logits, router_logits=router_logits, aux_loss=aux)
