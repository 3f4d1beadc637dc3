"""The experts of one device applied to its tokens: sort the (token, choice) pairs by expert, run the
grouped FFN (`kernels.grouped_matmul`, by the implementation `impl` picks), and sum each token's
choices weighted by their router probabilities (MaxText's permute / unpermute); optionally with a
capacity per expert.

Notation: T tokens, K choices per token, M = T x K (token, choice) pairs, X experts, E model width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.grouped_matmul import dense_expert_ffn, expert_ffn_impl, grouped_ffn


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


def combine_local(x_TxE, top_idx_TxK, top_w_TxK, weights, act, impl: str = "auto", capacity_factor: float = 0.0):
    """Top-k mixture of the given experts on local tokens: sum_k w_k FFN_{idx_k}(x); a choice whose
    expert id is num_experts (not among these experts) contributes 0. Dropless, unless
    `capacity_factor` > 0: then each expert takes its first `expert_capacity(...)` pairs in token
    order and the rest contribute 0 (the residual carries their tokens), as under a pod's capacity.
    weights: the (gate, up, down) `kernels.grouped_matmul.ExpertWeight`s."""
    t = top_idx_TxK.shape[0]
    n_exp = weights[0].w.shape[0]
    impl = expert_ffn_impl(impl, t, n_exp, top_idx_TxK.shape[-1])
    perm = permute(top_idx_TxK)
    group_sizes_X = jnp.bincount(perm.expert_M, length=n_exp).astype(jnp.int32)
    if capacity_factor > 0:
        m = perm.expert_M.shape[0]
        rank_M = jnp.arange(m) - (jnp.cumsum(group_sizes_X) - group_sizes_X)[jnp.minimum(perm.expert_M, n_exp - 1)]
        kept_choice = jnp.zeros((m,), bool).at[perm.order_M].set(rank_M < expert_capacity(m, n_exp, capacity_factor))
        top_w_TxK = jnp.where(kept_choice.reshape(top_w_TxK.shape), top_w_TxK, 0)
    if impl == "dense":
        return dense_expert_ffn(x_TxE, top_idx_TxK, top_w_TxK, weights, act)
    y_MxE = grouped_ffn(x_TxE[perm.token_M], group_sizes_X, perm.expert_M, weights, act, impl)
    return unpermute(y_MxE, perm, top_w_TxK, t)
