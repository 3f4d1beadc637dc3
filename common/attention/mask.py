"""Which keys each query sees, in O(L + S) arrays (`AttentionMask`), and the reference attention that
materialises it: the tests' yardstick, never a model's path."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32
LOWEST = float(jnp.finfo(F32).min)  # a finite minimum (not -inf) keeps fully masked rows free of NaN


class AttentionMask(NamedTuple):
    """Key s is visible to query l of row b iff k_valid[b, s], and (causal) s <= q_pos[l], and (packed
    rows) q_segment[b, l] == k_segment[b, s]. Key s sits at position s (cache slot s)."""

    k_valid: jax.Array  # [B, S] bool: real keys (left padding and unwritten cache slots are not)
    q_pos: jax.Array | None = None  # [L] int32, q_pos[0] + arange(L) (the kernels assume it): causal;
    # None: bidirectional (BERT)
    q_segment: jax.Array | None = None  # [B, L] document ids of packed rows
    k_segment: jax.Array | None = None  # [B, S]

    @classmethod
    def causal(cls, valid_BxL, segment_ids_BxL=None) -> AttentionMask:
        """A causal LM over whole rows: query l sees real keys 0..l (of its own document)."""
        length = valid_BxL.shape[1]
        return cls(valid_BxL.astype(bool), jnp.arange(length, dtype=jnp.int32), segment_ids_BxL, segment_ids_BxL)

    @classmethod
    def cached(cls, key_valid_BxS, index, length: int) -> AttentionMask:
        """`length` new tokens written at cache slot `index` of a cache whose real slots are key_valid."""
        return cls(key_valid_BxS.astype(bool), index + jnp.arange(length, dtype=jnp.int32))

    @classmethod
    def bidirectional(cls, valid_BxL) -> AttentionMask:
        """An encoder (BERT): every query sees every real key."""
        return cls(valid_BxL.astype(bool))

    def block(self, q_start, q_len: int, k_start, k_len: int):
        """The [B, q_len, k_len] piece of the mask at (q_start, k_start)."""
        ok = jax.lax.dynamic_slice_in_dim(self.k_valid, k_start, k_len, axis=1)[:, None, :]
        if self.q_pos is not None:
            k_pos = k_start + jnp.arange(k_len, dtype=jnp.int32)
            q_pos = jax.lax.dynamic_slice_in_dim(self.q_pos, q_start, q_len)
            ok = ok & (k_pos[None, None, :] <= q_pos[None, :, None])
        if self.q_segment is not None:
            qs = jax.lax.dynamic_slice_in_dim(self.q_segment, q_start, q_len, axis=1)
            ks = jax.lax.dynamic_slice_in_dim(self.k_segment, k_start, k_len, axis=1)
            ok = ok & (qs[:, :, None] == ks[:, None, :])
        return ok

    def dense(self, q_len: int):
        """The whole [B, L, S] mask (tests' reference only)."""
        s = self.k_valid.shape[1]
        return jnp.broadcast_to(self.block(0, q_len, 0, s), (self.k_valid.shape[0], q_len, s))


def reference_attention(q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask):
    """softmax(q k^T / sqrt(d)) v in float32 with the scores and mask materialised: the reference
    the tests hold the blockwise and kernel paths to (fully masked rows: the mean of v)."""
    hd = q_BxLxHxGxD.shape[-1]
    logits = jnp.einsum("bqhgd,bhsd->bhgqs", q_BxLxHxGxD.astype(F32), k_BxHxSxD.astype(F32)) * (hd ** -0.5)
    logits = jnp.where(mask.dense(q_BxLxHxGxD.shape[1])[:, None, None], logits, LOWEST)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhgqs,bhsd->bqhgd", probs, v_BxHxSxD.astype(F32)).astype(q_BxLxHxGxD.dtype)
