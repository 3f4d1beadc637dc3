"""Grouped SwiGLU FFNs: rows of many experts, each row through its own expert's weights.

Tokens are permuted so that each expert's tokens are contiguous, run through a grouped matmul, and
unpermuted (MaxText's plan). The grouped matmul has two implementations with the same result:
  ragged   `jax.lax.ragged_dot`: what GPU and TPU lower to a real grouped GEMM;
  blocked  rows padded per expert to whole blocks of `block` rows, then one `lax.map` over blocks,
           each a dense [block, hidden] @ [hidden, ffn] with its expert's weights. XLA:CPU lowers
           ragged_dot to a dense product over all experts (num_experts x the work), so the CPU
           uses this. Padding adds at most num_experts * (block - 1) rows.
Rows may carry the expert id num_experts ("no expert": an empty all-to-all slot, a choice of an
expert on another device); they come out as zeros. ragged_dot skips them; the blocked form still
spends its static number of blocks on them.

A few tokens (decoding) take neither: `combine_dense` runs every token through every expert, reading
each expert's weights once where they lie, and keeps the chosen outputs. Where tokens x experts is at
most DENSE_MAX_ROWS that is no more rows than the blocked form pads to, without its permutation or the
copy of an expert's weights out of the stack per block.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import current_platform, int8_matmul


def _ffn_ragged(x_MxE, group_sizes_E, expert_of_M, w_gate, w_up, w_down, act, scales=None):
    def mm(x, w, s):  # int8 weights: the convert fuses into the grouped GEMM, rows scaled by their expert
        y = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes_E)
        return y if s is None else (y * s[expert_of_M]).astype(x.dtype)

    sg, su, sd = scales or (None, None, None)
    return mm(act(mm(x_MxE, w_gate, sg)) * mm(x_MxE, w_up, su), w_down, sd)


def _block_rows(m: int, e: int) -> int:
    """A power of two near m / (4 e), in [8, 256]: padding stays a small fraction of the rows."""
    target = max(8, min(256, m // max(4 * e, 1)))
    return 1 << (target.bit_length() - 1)


def _ffn_blocked(x_MxE, group_sizes_E, expert_of_M, w_gate, w_up, w_down, act, scales=None):
    m, h = x_MxE.shape
    e = w_gate.shape[0]
    blk = _block_rows(m, e)
    n_blocks = -(-(m + e * (blk - 1)) // blk)  # static bound on the padded row count
    padded_E = -(-group_sizes_E // blk) * blk
    padded_start_E = jnp.cumsum(padded_E) - padded_E
    start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    ex_M = jnp.minimum(expert_of_M, e - 1)  # rows of no expert (id e, sorted last) go nowhere
    dest_M = jnp.where(expert_of_M < e, padded_start_E[ex_M] + (jnp.arange(m) - start_E[ex_M]), n_blocks * blk)
    x_pad = jnp.zeros((n_blocks * blk, h), x_MxE.dtype).at[dest_M].set(x_MxE, mode="drop")
    padded_end_E = jnp.cumsum(padded_E)
    block_expert = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(n_blocks) * blk, side="right"), e - 1)

    def mm(x, w, s, ex):
        return x @ w[ex] if s is None else int8_matmul(x, w[ex], s[ex])

    sg, su, sd = scales or (None, None, None)

    def one_block(args):
        xb, ex = args
        return mm(act(mm(xb, w_gate, sg, ex)) * mm(xb, w_up, su, ex), w_down, sd, ex)

    # Every block is computed, the empty ones too: skipping them with lax.cond deadlocks XLA:CPU's
    # collectives when this runs inside an expert-parallel shard_map's backward pass.
    y = jax.lax.map(one_block, (x_pad.reshape(n_blocks, blk, h), block_expert))
    return y.reshape(n_blocks * blk, -1).at[dest_M].get(mode="fill", fill_value=0)


FFN_IMPLS = {"ragged": _ffn_ragged, "blocked": _ffn_blocked}
DENSE_MAX_ROWS = 64  # tokens x experts up to which the CPU runs every token through every expert


def default_ffn_impl(num_tokens: int, num_experts: int) -> str:
    """"ragged" on GPU and TPU; on the CPU "blocked", or "dense" for few tokens (decoding)."""
    if current_platform() != "cpu":
        return "ragged"
    return "dense" if num_tokens * num_experts <= DENSE_MAX_ROWS else "blocked"


def combine_dense(x_TxE, top_idx_TxK, top_w_TxK, weights, act, scales=None):
    """sum_k w_k FFN_{idx_k}(x) by running every token through every expert (ids of no expert give 0)."""
    w_gate, w_up, w_down = weights
    e = w_gate.shape[0]

    def mm(x, w, s):  # x [E, T, in], w [E, in, out]: the experts a batch dimension, each weight read in place
        return jnp.einsum("eti,eio->eto", x, w) if s is None else jax.vmap(int8_matmul)(x, w, s)

    sg, su, sd = scales or (None, None, None)
    x_ExTxE = jnp.broadcast_to(x_TxE, (e, *x_TxE.shape))
    y_ExTxH = mm(act(mm(x_ExTxE, w_gate, sg)) * mm(x_ExTxE, w_up, su), w_down, sd)
    chosen_TxKxE = jax.nn.one_hot(top_idx_TxK, e, dtype=y_ExTxH.dtype)  # id e (no expert): a row of zeros
    return jnp.einsum("tk,tke,eth->th", top_w_TxK.astype(y_ExTxH.dtype), chosen_TxKxE, y_ExTxH)


class Permutation(NamedTuple):
    """(token, choice) pairs sorted by expert (MaxText's permute): pair m of the sorted order is
    choice order[m] % k of token `token[m]`, bound for expert `expert[m]`."""

    order_M: jax.Array  # positions in the flattened [T * K] choices, in sorted order
    expert_M: jax.Array  # each sorted pair's expert id
    token_M: jax.Array  # each sorted pair's token


def permute(top_idx_TxK) -> Permutation:
    k = top_idx_TxK.shape[1]
    expert_of_choice = top_idx_TxK.reshape(-1)
    order_M = jnp.argsort(expert_of_choice, stable=True)
    return Permutation(order_M, expert_of_choice[order_M], order_M // k)


def unpermute(y_MxE, perm: Permutation, top_w_TxK, num_tokens: int):
    """sum over each token's pairs of router weight x output: the [T, E] MoE output."""
    y_MxE = y_MxE * top_w_TxK.reshape(-1)[perm.order_M][:, None].astype(y_MxE.dtype)
    return jnp.zeros((num_tokens, y_MxE.shape[-1]), y_MxE.dtype).at[perm.token_M].add(y_MxE)


def expert_capacity(pairs: int, num_experts: int, capacity_factor: float) -> int:
    """Pairs an expert takes on a device without expert parallelism: ceil(factor x pairs / experts)."""
    return max(1, math.ceil(capacity_factor * pairs / num_experts))


def combine_local(x_TxE, top_idx_TxK, top_w_TxK, weights, act, scales=None, impl=None, capacity_factor: float = 0.0):
    """Top-k mixture of the given experts on local tokens: sum_k w_k FFN_{idx_k}(x); a choice whose
    expert id is num_experts (not among these experts) contributes 0. Dropless, unless
    `capacity_factor` > 0: then each expert takes its first `expert_capacity(...)` pairs in token
    order and the rest contribute 0 (the residual carries their tokens), as under a pod's capacity."""
    t = top_idx_TxK.shape[0]
    e = weights[0].shape[0]
    impl = impl or default_ffn_impl(t, e)
    perm = permute(top_idx_TxK)
    group_sizes = jnp.bincount(perm.expert_M, length=e).astype(jnp.int32)
    if capacity_factor > 0:
        m = perm.expert_M.shape[0]
        rank_M = jnp.arange(m) - (jnp.cumsum(group_sizes) - group_sizes)[jnp.minimum(perm.expert_M, e - 1)]
        kept_choice = jnp.zeros((m,), bool).at[perm.order_M].set(rank_M < expert_capacity(m, e, capacity_factor))
        top_w_TxK = jnp.where(kept_choice.reshape(top_w_TxK.shape), top_w_TxK, 0)
    if impl == "dense":
        return combine_dense(x_TxE, top_idx_TxK, top_w_TxK, weights, act, scales)
    y_MxE = FFN_IMPLS[impl](x_TxE[perm.token_M], group_sizes, perm.expert_M, *weights, act, scales)
    return unpermute(y_MxE, perm, top_w_TxK, t)
