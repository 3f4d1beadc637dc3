"""SenseBERT (Levine et al., ACL 2020) in Flax: a BERT encoder whose input embedding adds the
mean supersense embedding of the token's allowed supersenses, and whose pre-training heads
predict the masked word and its supersense.

  input embedding   (W + S M) x + p + t        W [vocab, hidden] word embeddings, S [45, hidden]
                                               supersense embeddings, M [vocab, 45] with
                                               M[w, s] = 1/|A(w)| for s in A(w) (a constant)
  MLM head          W^T g(h) + b               g: dense + gelu + LayerNorm; tied to W
  supersense head   S^T g_s(h)                 S shared with the input embedding

The attention math is the project's (`common.attention.attention`, float32 softmax, blockwise); the
encoder is post-LayerNorm BERT, with dropout on the attention output (not on its probabilities).
Fine-tuning heads (token classification, word-in-context) sit on the same `encoder` parameters,
so a pre-trained checkpoint's encoder drops in.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from common.attention import AttentionMask, attention
from common.layers import Dense, activation, normal_init
from common.layers import layer_norm as _layer_norm
from sensebert_jax.config import SenseBertConfig


def dense(cfg: SenseBertConfig, features: int, axes, name: str) -> Dense:
    """BERT's Linear: with a bias, in the config's dtypes and initialiser."""
    return Dense(features, axes, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, use_bias=True,
                 kernel_init=normal_init(cfg.initializer_range), name=name)


def layer_norm(cfg: SenseBertConfig, name: str):
    return _layer_norm(cfg.layer_norm_eps, cfg.compute_dtype, cfg.weights_dtype, name)


class EncoderLayer(nn.Module):
    cfg: SenseBertConfig

    @nn.compact
    def __call__(self, h_BxLxE, mask: AttentionMask, deterministic: bool):
        cfg = self.cfg
        b, length, _ = h_BxLxE.shape
        nh, hd = cfg.num_attention_heads, cfg.head_dim

        def proj(name):
            return dense(cfg, nh * hd, ("embed", "q_heads"), name)(h_BxLxE)

        q = proj("query").reshape(b, length, nh, 1, hd)
        k = proj("key").reshape(b, length, nh, hd).transpose(0, 2, 1, 3)  # [B, heads, L, D]
        v = proj("value").reshape(b, length, nh, hd).transpose(0, 2, 1, 3)
        attn = attention(q, k, v, mask).reshape(b, length, nh * hd)
        attn = dense(cfg, cfg.hidden_size, ("q_heads", "embed"), "attention_output")(attn)
        attn = nn.Dropout(cfg.hidden_dropout_prob)(attn, deterministic=deterministic)
        h = layer_norm(cfg, "attention_layer_norm")(h_BxLxE + attn)
        ff = activation(cfg.hidden_act)(dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(h))
        ff = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(ff)
        ff = nn.Dropout(cfg.hidden_dropout_prob)(ff, deterministic=deterministic)
        return layer_norm(cfg, "output_layer_norm")(h + ff)


class SenseBertEncoder(nn.Module):
    """(hidden [batch, length, hidden], word embeddings W, supersense embeddings S)."""

    cfg: SenseBertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, supersense_matrix, deterministic: bool = True):
        cfg = self.cfg
        dtype, pdtype = cfg.compute_dtype, cfg.weights_dtype

        init = normal_init(cfg.initializer_range)

        def table(name, n, axes):
            return self.param(name, nn.with_logical_partitioning(init, axes), (n, cfg.hidden_size), pdtype)

        words = table("word_embeddings", cfg.vocab_size, ("vocab", "embed"))
        senses = table("supersense_embeddings", cfg.num_supersenses, (None, "embed"))
        positions = table("position_embeddings", cfg.max_position_embeddings, (None, "embed"))
        types = table("token_type_embeddings", cfg.type_vocab_size, (None, "embed"))
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        m_BxLxS = supersense_matrix[input_ids].astype(dtype)  # row w of M: 1/|A(w)| on A(w)
        x = (words[input_ids].astype(dtype) + m_BxLxS @ senses.astype(dtype) + positions[:length].astype(dtype)
             + types[token_type_ids].astype(dtype))
        h = layer_norm(cfg, "embeddings_layer_norm")(x)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        mask = AttentionMask.bidirectional(attention_mask)  # keys only, as BERT's extended mask
        for i in range(cfg.num_hidden_layers):
            h = EncoderLayer(cfg, name=f"layer_{i}")(h, mask, deterministic)
        return h, words, senses


def _transform(cfg, h, name):
    """BERT's head transform: dense + activation + LayerNorm."""
    h = activation(cfg.hidden_act)(dense(cfg, cfg.hidden_size, ("embed", None), f"{name}_dense")(h))
    return layer_norm(cfg, f"{name}_layer_norm")(h)


class SenseBertForPretraining(nn.Module):
    """Returns (mlm_logits [batch, length, vocab], supersense_logits [batch, length, 45]) in float32."""

    cfg: SenseBertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, supersense_matrix, deterministic: bool = True):
        cfg = self.cfg
        h, words, senses = SenseBertEncoder(cfg, name="encoder")(input_ids, attention_mask, token_type_ids,
                                                                 supersense_matrix, deterministic)
        mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                              (cfg.vocab_size,), cfg.weights_dtype)
        mlm = _transform(cfg, h, "mlm") @ words.astype(h.dtype).T + mlm_bias.astype(h.dtype)
        ss = _transform(cfg, h, "supersense") @ senses.astype(h.dtype).T
        return mlm.astype(jnp.float32), ss.astype(jnp.float32)


class SenseBertForTokenClassification(nn.Module):
    """Per-token logits [batch, length, num_labels] (supersense tagging: 45 labels)."""

    cfg: SenseBertConfig
    num_labels: int

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, supersense_matrix, deterministic: bool = True):
        cfg = self.cfg
        h, _, _ = SenseBertEncoder(cfg, name="encoder")(input_ids, attention_mask, token_type_ids, supersense_matrix,
                                                        deterministic)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return dense(cfg, self.num_labels, ("embed", None), "classifier")(h).astype(jnp.float32)


class SenseBertForWordInContext(nn.Module):
    """Same-sense logits [batch, 2] for a sentence pair from [CLS] and the target word's last piece
    in each sentence (positions target_BxN, N = 2)."""

    cfg: SenseBertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, supersense_matrix, targets_Bx2,
                 deterministic: bool = True):
        cfg = self.cfg
        h, _, _ = SenseBertEncoder(cfg, name="encoder")(input_ids, attention_mask, token_type_ids, supersense_matrix,
                                                        deterministic)
        picked = jnp.take_along_axis(h, targets_Bx2[..., None], axis=1)  # [b, 2, hidden]
        feats = jnp.concatenate([h[:, 0], picked[:, 0], picked[:, 1], picked[:, 0] * picked[:, 1]], axis=-1)
        feats = nn.Dropout(cfg.hidden_dropout_prob)(feats, deterministic=deterministic)
        return dense(cfg, 2, (None, None), "classifier")(feats).astype(jnp.float32)
