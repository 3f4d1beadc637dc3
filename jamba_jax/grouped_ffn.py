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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import current_platform, int8_matmul


def _ffn_ragged(x_MxH, group_sizes_E, expert_of_M, w_gate, w_up, w_down, act, scales=None):
    def mm(x, w, s):  # int8 weights: the convert fuses into the grouped GEMM, rows scaled by their expert
        y = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes_E)
        return y if s is None else (y * s[expert_of_M]).astype(x.dtype)

    sg, su, sd = scales or (None, None, None)
    return mm(act(mm(x_MxH, w_gate, sg)) * mm(x_MxH, w_up, su), w_down, sd)


def _block_rows(m: int, e: int) -> int:
    """A power of two near m / (4 e), in [8, 256]: padding stays a small fraction of the rows."""
    target = max(8, min(256, m // max(4 * e, 1)))
    return 1 << (target.bit_length() - 1)


def _ffn_blocked(x_MxH, group_sizes_E, expert_of_M, w_gate, w_up, w_down, act, scales=None):
    m, h = x_MxH.shape
    e = w_gate.shape[0]
    blk = _block_rows(m, e)
    n_blocks = -(-(m + e * (blk - 1)) // blk)  # static bound on the padded row count
    padded_E = -(-group_sizes_E // blk) * blk
    padded_start_E = jnp.cumsum(padded_E) - padded_E
    start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    ex_M = jnp.minimum(expert_of_M, e - 1)  # rows of no expert (id e, sorted last) go nowhere
    dest_M = jnp.where(expert_of_M < e, padded_start_E[ex_M] + (jnp.arange(m) - start_E[ex_M]), n_blocks * blk)
    x_pad = jnp.zeros((n_blocks * blk, h), x_MxH.dtype).at[dest_M].set(x_MxH, mode="drop")
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


def default_ffn_impl() -> str:
    return "blocked" if current_platform() == "cpu" else "ragged"


def combine_local(x_TxH, top_idx_TxK, top_w_TxK, weights, act, scales=None, impl=None):
    """Dropless top-k mixture of the given experts on local tokens: sum_k w_k FFN_{idx_k}(x); a
    choice whose expert id is num_experts (not among these experts) contributes 0."""
    t, k = top_idx_TxK.shape
    e = weights[0].shape[0]
    expert_of_M = top_idx_TxK.reshape(-1)  # M = t * k (token, choice) pairs
    order_M = jnp.argsort(expert_of_M, stable=True)
    token_of_M = order_M // k
    group_sizes = jnp.bincount(expert_of_M, length=e).astype(jnp.int32)
    y_MxH = FFN_IMPLS[impl or default_ffn_impl()](x_TxH[token_of_M], group_sizes, expert_of_M[order_M], *weights,
                                                  act, scales)
    y_MxH = y_MxH * top_w_TxK.reshape(-1)[order_M][:, None].astype(y_MxH.dtype)
    return jnp.zeros((t, y_MxH.shape[-1]), y_MxH.dtype).at[token_of_M].add(y_MxH)
