"""The tiling every attention path shares: a `Plan` (queries and keys per block, block counts, the G
query heads of a kv head), the rows layout (a query block's G heads folded into its rows, so one
[rows, keys] matmul serves them all), the mask of one block, and the range of key blocks worth
reading. The blockwise XLA path, the Pallas kernels' wrapper and the decode path are built from
these.

Shapes: q [B, L, H, G, D]; k, v [B, H, S, D]; rows [Q, B, H, R, D] with Q query blocks and
R = bq x G rows each (row = query x G + group).
"""

from __future__ import annotations

import jax.numpy as jnp

from common.attention.mask import F32, LOWEST, AttentionMask
from kernels.flash_attention import Plan

__all__ = ["LOWEST", "Plan", "block_rows_mask", "dot", "key_block_range", "pad_keys", "padded_mask", "plan",
           "q_block_max_pos", "rows", "unrows"]


def plan(q_len: int, k_len: int, block_q: int, block_k: int, g: int) -> Plan:
    """Blocks of at most block_q queries and block_k keys (one block when the lengths are shorter)."""
    bq, bk = min(block_q, q_len), min(block_k, k_len)
    return Plan(bq, bk, -(-q_len // bq), -(-k_len // bk), g)


def padded_mask(mask: AttentionMask, p: Plan) -> AttentionMask:
    """The mask padded to whole blocks: extra keys invalid, extra queries copies of the last one."""
    q_pad = p.nq * p.bq - (mask.q_pos.shape[0] if mask.q_pos is not None else 0)
    k_pad = p.nk * p.bk - mask.k_valid.shape[1]

    def pad(x, n, axis, mode="constant"):
        if x is None or n == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n)
        return jnp.pad(x, widths, mode=mode)

    q_pad_seg = p.nq * p.bq - mask.q_segment.shape[1] if mask.q_segment is not None else 0
    return AttentionMask(pad(mask.k_valid, k_pad, 1), pad(mask.q_pos, q_pad, 0, "edge"),
                         pad(mask.q_segment, q_pad_seg, 1, "edge"), pad(mask.k_segment, k_pad, 1))


def key_block_range(mask: AttentionMask, p: Plan):
    """[first, last] key blocks holding a key some row can see (empty range: first > last)."""
    any_valid = jnp.any(mask.k_valid, axis=0)
    idx = jnp.arange(any_valid.shape[0], dtype=jnp.int32)
    first = jnp.min(jnp.where(any_valid, idx, any_valid.shape[0])) // p.bk
    last = jnp.max(jnp.where(any_valid, idx, -1))
    return first, jnp.where(last < 0, -1, last // p.bk)


def q_block_max_pos(mask: AttentionMask, p: Plan):
    """[Q] the last (largest) position of each query block."""
    return mask.q_pos.reshape(p.nq, p.bq)[:, -1]


def rows(x_BxLxHxGxD, p: Plan):
    """[B, L, H, G, D] -> [Q, B, H, bq * G, D]: query blocks, each kv head's G query heads in the rows."""
    b, length, nkv, g, d = x_BxLxHxGxD.shape
    x = jnp.pad(x_BxLxHxGxD, [(0, 0), (0, p.nq * p.bq - length), (0, 0), (0, 0), (0, 0)])
    return x.reshape(b, p.nq, p.bq, nkv, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(p.nq, b, nkv, p.bq * g, d)


def unrows(x_QxBxHxRxD, length: int, g: int):
    """The inverse of `rows`: [Q, B, H, R, D] -> [B, length, H, G, D]."""
    nq, b, nkv, r, d = x_QxBxHxRxD.shape
    x = x_QxBxHxRxD.reshape(nq, b, nkv, r // g, g, d).transpose(1, 0, 3, 2, 4, 5)
    return x.reshape(b, nq * (r // g), nkv, g, d)[:, :length]


def pad_keys(x_BxHxSxD, p: Plan):
    return jnp.pad(x_BxHxSxD, [(0, 0), (0, 0), (0, p.nk * p.bk - x_BxHxSxD.shape[2]), (0, 0)])


def block_rows_mask(mask: AttentionMask, i, k_start, p: Plan, k_from=None):
    """The mask of query block i against the bk keys from `k_start`, in the rows layout: [B, 1, R, bk];
    with `k_from`, keys before it are hidden too (a last block moved back to end at the last key)."""
    m = mask.block(i * p.bq, p.bq, k_start, p.bk)
    if k_from is not None:
        m = m & (k_start + jnp.arange(p.bk, dtype=jnp.int32) >= k_from)[None, None, :]
    return jnp.broadcast_to(m[:, :, None, :], (m.shape[0], p.bq, p.g, p.bk)).reshape(m.shape[0], 1, p.rows, p.bk)


def dot(a, b, spec: str):
    """einsum with float32 accumulation (bfloat16 inputs stay bfloat16 matmuls)."""
    return jnp.einsum(spec, a, b, preferred_element_type=F32)
