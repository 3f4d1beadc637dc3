"""Attention math shared by the models: dense softmax attention in float32 and the blockwise
(online-softmax) form for long key sequences, on grouped-query layouts.

q [B, L, V, G, D] (V kv heads, G query heads per kv head), k and v [B, S, V, D], mask [B, L, S].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def make_attention_mask(valid_BxL, segment_ids_BxL=None):
    """Boolean [batch, q, k] mask: causal, keys must be real tokens, and (packed rows) same segment."""
    length = valid_BxL.shape[1]
    causal_LxS = jnp.tril(jnp.ones((length, length), dtype=bool))
    mask = causal_LxS[None] & valid_BxL[:, None, :]
    if segment_ids_BxL is not None:
        mask = mask & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    return mask


ATTN_BLOCK = 1024  # keys per block of the online-softmax path, used past 2 * ATTN_BLOCK keys


def dense_attention(q_BxLxVxGxD, k_BxSxVxD, v_BxSxVxD, mask_BxLxS):
    """softmax(q k^T / sqrt(d)) v in float32, materialising [batch, heads, q, s]."""
    hd = q_BxLxVxGxD.shape[-1]
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q_BxLxVxGxD, k_BxSxVxD) * (hd ** -0.5)
    # A finite minimum (not -inf) keeps fully masked rows (left padding) free of NaN.
    logits = jnp.where(mask_BxLxS[:, None, None], logits.astype(_F32), jnp.finfo(_F32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxVxD.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v_BxSxVxD)


def blockwise_attention(q_BxLxVxGxD, k_BxSxVxD, v_BxSxVxD, mask_BxLxS, block: int, live_blocks=None):
    """The same attention with an online softmax over key blocks (memory-efficient attention, Rabe &
    Staats 2021; FlashAttention's recurrence): memory O(q x block) instead of O(q x s).

    live_blocks: a (traced) count of leading key blocks that can hold unmasked keys; later blocks
    are skipped (causal prefill and decoding from a long cache). None visits every block.
    """
    b, s, nkv, hd = k_BxSxVxD.shape
    pad = (-s) % block
    if pad:
        k_BxSxVxD = jnp.pad(k_BxSxVxD, [(0, 0), (0, pad), (0, 0), (0, 0)])
        v_BxSxVxD = jnp.pad(v_BxSxVxD, [(0, 0), (0, pad), (0, 0), (0, 0)])
        mask_BxLxS = jnp.pad(mask_BxLxS, [(0, 0), (0, 0), (0, pad)])
    n_blocks = (s + pad) // block
    q32 = q_BxLxVxGxD.astype(_F32) * (hd ** -0.5)
    lowest = jnp.finfo(_F32).min
    q_len, groups = q_BxLxVxGxD.shape[1], q_BxLxVxGxD.shape[3]

    def body(j, carry):
        m, denom, acc = carry  # running max [b, K, G, q], softmax denominator (same), output [b, q, K, G, d]
        kb = jax.lax.dynamic_slice_in_dim(k_BxSxVxD, j * block, block, axis=1).astype(_F32)
        vb = jax.lax.dynamic_slice_in_dim(v_BxSxVxD, j * block, block, axis=1).astype(_F32)
        mb = jax.lax.dynamic_slice_in_dim(mask_BxLxS, j * block, block, axis=2)
        logits = jnp.where(mb[:, None, None], jnp.einsum("bqkgd,bskd->bkgqs", q32, kb), lowest)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        denom = denom * corr + p.sum(-1)
        acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + jnp.einsum("bkgqs,bskd->bqkgd", p, vb)
        return m_new, denom, acc

    init = (jnp.full((b, nkv, groups, q_len), lowest, _F32), jnp.zeros((b, nkv, groups, q_len), _F32),
            jnp.zeros((b, q_len, nkv, groups, hd), _F32))
    upper = n_blocks if live_blocks is None else jnp.minimum(live_blocks, n_blocks)
    _, denom, acc = jax.lax.fori_loop(0, upper, body, init)
    return acc / jnp.moveaxis(denom, -1, 1)[..., None]
