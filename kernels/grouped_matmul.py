"""The experts' SwiGLU FFN over rows of many experts, each row through its own expert's weights, by
one of several implementations with the same result (`expert_ffn_impl` picks; `grouped_ffn` and
`dense_expert_ffn` run them).

Notation: M rows (token, choice pairs sorted so each expert's rows are contiguous), T tokens, K
choices per token, X experts, E model width (the FFN's input and output), F expert hidden width, R a LoRA
rank. Each of the three weights is an `ExpertWeight`: gate, up w [X, E, F], down w [X, F, E]; optionally
their ExpertsInt8 scales ([X, F], [X, F], [X, E]) and LoRA adapters (A [X, in, R], B [X, R, out]: the
expert's rows get (x A) B on top, jamba_jax.lora).

  ragged   `jax.lax.ragged_dot` over the sorted rows: what GPU and TPU lower to a real grouped GEMM.
  blocked  the sorted rows padded per expert to whole blocks of `block` rows; for each expert its weight
           sliced once, then a dense [block, E] @ [E, F] per block of its rows (a loop over experts and
           their blocks): portable, and what the CPU runs (XLA:CPU lowers ragged_dot to a dense product over
           all experts, X times the work). Padding adds at most X * (block - 1) rows. Its own VJP: the input
           gradient the same loops over w^T, each expert's weight gradient summed over its blocks in
           float32 and written once (autodiff of a loop over blocks adds a full [X, E, F] cotangent per
           block: 1.45x slower fwd+bwd at hidden 1024, BENCHMARKS `mfu`).
  dense    every token through every expert, the experts a batch dimension (each weight read where it
           lies, no permutation), the chosen outputs kept: for few tokens (decoding, short prompts) on the
           CPU, where the T x (X - K) rows it adds cost less than the blocked form's weight copies and
           per-block reads (`DENSE_MAX_EXTRA_ROWS`).

Every implementation tags the experts' hidden activations act(x W_gate) * (x W_up) with
`checkpoint_name(..., HIDDEN_NAME)`, so a remat policy can keep them (`jamba_jax.remat`).

Rows may carry the expert id X ("no expert": an empty all-to-all slot, a choice of an expert on
another device); they come out as zeros. ragged_dot and the blocked form skip them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels.int8_matmul import int8_matmul
from kernels.platform import current_platform

FFN_IMPLS = ("auto", "ragged", "blocked", "dense")
HIDDEN_NAME = "moe_hidden"  # the checkpoint_name of the experts' hidden activations, act(x W_gate) * (x W_up)
# "auto" on the CPU runs every token through every expert while tokens x (experts - top_k), the rows it computes
# beyond the chosen ones, stay within this: the dense form reads each weight once in one product per expert, the
# blocked one slices it and reads it again per block, which costs more than the extra rows below the bound (one
# MoE layer inside a model, weights coming from memory: hidden 256 / 4 experts top-2, dense 0.72-0.87x the
# blocked time up to 384 tokens, 1.1x at 512; hidden 1024 / expert 3584 crosses at 512 extra rows for 4
# experts and 450-900 for 16)
DENSE_MAX_EXTRA_ROWS = 512


def expert_ffn_impl(impl: str, num_tokens: int, num_experts: int, top_k: int) -> str:
    """`impl`, or for "auto": "ragged" on GPU and TPU; on the CPU "blocked", or "dense" for few tokens
    (`DENSE_MAX_EXTRA_ROWS`)."""
    if impl not in FFN_IMPLS:
        raise ValueError(f"expert FFN impl={impl!r}: expected one of {FFN_IMPLS}")
    if impl != "auto":
        return impl
    if current_platform() != "cpu":
        return "ragged"
    return "dense" if num_tokens * max(num_experts - top_k, 0) <= DENSE_MAX_EXTRA_ROWS else "blocked"


class ExpertWeight(NamedTuple):
    """One of the experts' three weights, with what its matmul adds (module docstring)."""

    w: jax.Array  # [X, in, out], int8 when `scale` is given
    scale: jax.Array | None = None  # [X, out] ExpertsInt8 scales
    lora_a: jax.Array | None = None  # [X, in, R]
    lora_b: jax.Array | None = None  # [X, R, out]


def _ffn(x, weights, act, mm):
    """down(act(gate(x)) * up(x)) with `mm(x, ExpertWeight)` the grouped product."""
    gate, up, down = weights
    return mm(checkpoint_name(act(mm(x, gate)) * mm(x, up), HIDDEN_NAME), down)


def _ffn_ragged(x_MxE, group_sizes_X, expert_of_M, weights, act):
    def mm(x, ew):  # int8 weights: the convert fuses into the grouped GEMM, rows scaled by their expert
        y = jax.lax.ragged_dot(x, ew.w.astype(x.dtype), group_sizes_X)
        if ew.scale is not None:
            y = (y * ew.scale[expert_of_M]).astype(x.dtype)
        if ew.lora_a is not None:
            xa = jax.lax.ragged_dot(x, ew.lora_a.astype(x.dtype), group_sizes_X)
            y = y + jax.lax.ragged_dot(xa, ew.lora_b.astype(x.dtype), group_sizes_X)
        return y

    return _ffn(x_MxE, weights, act, mm)


def _block_rows(m: int, x: int) -> int:
    """A power of two near m / (4 x), in [8, 256]: padding stays a small fraction of the rows."""
    target = max(8, min(256, m // max(4 * x, 1)))
    return 1 << (target.bit_length() - 1)


def _zeros(shape, dtype, *like):
    """Zeros that vary over the mesh axes the arrays `like` vary over: inside a shard_map a loop's initial carry
    must have its body's manual-axis type, and a plain jnp.zeros varies over none (an empty sum of each: 0
    whatever the arrays hold, typed as they are)."""
    return jnp.broadcast_to(sum(a.reshape(-1)[:0].sum().astype(dtype) for a in like), shape)


def _blocks_matmul_impl(x_NxBxI, w_XxIxO, first_X, end_X, transposed: bool = False):
    """y[i] = x[i] @ w[e] (w[e]^T when `transposed`) for each block i of expert e; zeros for the other blocks.
    Each expert's weight is sliced once for all its blocks."""
    out = w_XxIxO.shape[1] if transposed else w_XxIxO.shape[2]

    def expert(e, y):
        w_e = jax.lax.dynamic_index_in_dim(w_XxIxO, e, keepdims=False)

        def block(i, y):
            x_i = jax.lax.dynamic_index_in_dim(x_NxBxI, i, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(y, x_i @ (w_e.T if transposed else w_e), i, 0)

        return jax.lax.fori_loop(first_X[e], end_X[e], block, y)

    y0 = _zeros((*x_NxBxI.shape[:2], out), x_NxBxI.dtype, x_NxBxI, w_XxIxO)
    return jax.lax.fori_loop(0, w_XxIxO.shape[0], expert, y0)


def _blocks_weight_grad(x_NxBxI, dy_NxBxO, first_X, end_X, like_XxIxO):
    """dw[e] = sum over e's blocks i of x[i]^T dy[i], accumulated in float32 for all of e's blocks before it
    is written once (a read-modify-write of dw[e] per block would move the weight through memory each time)."""
    def expert(e, dw):
        def block(i, acc):
            x_i, dy_i = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in (x_NxBxI, dy_NxBxO))
            return acc + jnp.matmul(x_i.T, dy_i, preferred_element_type=jnp.float32)

        acc0 = _zeros(like_XxIxO.shape[1:], jnp.float32, x_NxBxI, dy_NxBxO)
        acc = jax.lax.fori_loop(first_X[e], end_X[e], block, acc0)
        return jax.lax.dynamic_update_index_in_dim(dw, acc.astype(dw.dtype), e, 0)

    dw0 = _zeros(like_XxIxO.shape, like_XxIxO.dtype, x_NxBxI, dy_NxBxO, like_XxIxO)
    return jax.lax.fori_loop(0, like_XxIxO.shape[0], expert, dw0)


@jax.custom_vjp
def _blocks_matmul(x_NxBxI, w_XxIxO, first_X, end_X):
    return _blocks_matmul_impl(x_NxBxI, w_XxIxO, first_X, end_X)


def _blocks_matmul_fwd(x_NxBxI, w_XxIxO, first_X, end_X):
    return _blocks_matmul_impl(x_NxBxI, w_XxIxO, first_X, end_X), (x_NxBxI, w_XxIxO, first_X, end_X)


def _blocks_matmul_bwd(res, dy_NxBxO):
    x_NxBxI, w_XxIxO, first_X, end_X = res
    dx = _blocks_matmul_impl(dy_NxBxO, w_XxIxO, first_X, end_X, transposed=True)
    return dx, _blocks_weight_grad(x_NxBxI, dy_NxBxO, first_X, end_X, w_XxIxO), None, None


_blocks_matmul.defvjp(_blocks_matmul_fwd, _blocks_matmul_bwd)


def blocks_matmul(x_NxBxI, w_XxIxO, first_X, end_X):
    """y[i] = x[i] @ w[e] for each block i in [first_X[e], end_X[e]) of expert e, zeros for blocks of none. Inside
    a shard_map, x and w are first typed as varying over each other's mesh axes too (adding a zero that does), so
    autodiff sums each gradient over the axes its input did not vary over (the psum of that add's transpose) and
    the custom VJP sees matching types."""
    zero = _zeros((), x_NxBxI.dtype, x_NxBxI, w_XxIxO)
    return _blocks_matmul(x_NxBxI + zero, w_XxIxO + zero.astype(w_XxIxO.dtype), first_X, end_X)


def _expert_mm(x, ew):
    """x @ one expert's weight (its slices of an ExpertWeight): float or ExpertsInt8, plus its LoRA adapter."""
    y = x @ ew.w if ew.scale is None else int8_matmul(x, ew.w, ew.scale)
    return y if ew.lora_a is None else y + (x @ ew.lora_a.astype(x.dtype)) @ ew.lora_b.astype(x.dtype)


def _ffn_fused(x_NxBxE, weights, first_X, end_X, act):
    """The whole FFN a block at a time (each expert's three weights sliced once): only one block's hidden
    activations exist at a time, as a forward pass without gradients wants (a prefill chunk)."""
    def expert(e, y):
        w_e = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False), weights)

        def block(i, y):
            y_i = _ffn(jax.lax.dynamic_index_in_dim(x_NxBxE, i, keepdims=False), w_e, act, _expert_mm)
            return jax.lax.dynamic_update_index_in_dim(y, y_i.astype(y.dtype), i, 0)

        return jax.lax.fori_loop(first_X[e], end_X[e], block, y)

    y0 = _zeros((*x_NxBxE.shape[:2], weights[2].w.shape[-1]), x_NxBxE.dtype, x_NxBxE, *jax.tree.leaves(weights))
    return jax.lax.fori_loop(0, weights[0].w.shape[0], expert, y0)


def _ffn_per_matmul(x_NxBxE, weights, first_X, end_X, act):
    """The FFN one matmul at a time over all blocks (`blocks_matmul`, with its own VJP): what gradients take."""
    n_blocks, n_exp = x_NxBxE.shape[0], weights[0].w.shape[0]

    def mm(x, ew):
        if ew.scale is None:
            y = blocks_matmul(x, ew.w, first_X, end_X)
        else:  # ExpertsInt8: the int8 weight has no gradient; each block dequantizes its expert's slice
            block_expert = jnp.minimum(jnp.searchsorted(end_X, jnp.arange(n_blocks), side="right"), n_exp - 1)
            y = jax.lax.map(lambda a: int8_matmul(a[0], ew.w[a[1]], ew.scale[a[1]]), (x, block_expert))
        if ew.lora_a is None:
            return y
        xa = blocks_matmul(x, ew.lora_a.astype(x.dtype), first_X, end_X)
        return y + blocks_matmul(xa, ew.lora_b.astype(x.dtype), first_X, end_X)

    return _ffn(x_NxBxE, weights, act, mm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ffn_blocks(x_NxBxE, weights, first_X, end_X, act):
    """The blocked FFN: fused block by block when not differentiated, per matmul (and its VJP) when it is."""
    return _ffn_fused(x_NxBxE, weights, first_X, end_X, act)


def _ffn_blocks_fwd(x_NxBxE, weights, first_X, end_X, act):
    return jax.vjp(lambda x, w: _ffn_per_matmul(x, w, first_X, end_X, act), x_NxBxE, weights)


def _ffn_blocks_bwd(act, vjp, dy):
    return (*vjp(dy), None, None)


_ffn_blocks.defvjp(_ffn_blocks_fwd, _ffn_blocks_bwd)


def _ffn_blocked(x_MxE, group_sizes_X, expert_of_M, weights, act):
    m, e = x_MxE.shape
    n_exp = weights[0].w.shape[0]
    blk = _block_rows(m, n_exp)
    n_blocks = -(-(m + n_exp * (blk - 1)) // blk)  # static bound on the padded row count
    blocks_X = -(-group_sizes_X // blk)
    end_X = jnp.cumsum(blocks_X)
    first_X = end_X - blocks_X
    start_X = jnp.cumsum(group_sizes_X) - group_sizes_X
    ex_M = jnp.minimum(expert_of_M, n_exp - 1)  # rows of no expert (id X, sorted last) go nowhere
    dest_M = jnp.where(expert_of_M < n_exp, first_X[ex_M] * blk + (jnp.arange(m) - start_X[ex_M]), n_blocks * blk)
    x_pad = jnp.zeros((n_blocks * blk, e), x_MxE.dtype).at[dest_M].set(x_MxE, mode="drop")
    y = _ffn_blocks(x_pad.reshape(n_blocks, blk, e), weights, first_X, end_X, act)
    return y.reshape(n_blocks * blk, -1).at[dest_M].get(mode="fill", fill_value=0)


def grouped_ffn(x_MxE, group_sizes_X, expert_of_M, weights, act, impl: str = "blocked"):
    """FFN_{expert_of_M[m]}(x[m]) for rows sorted by expert (`group_sizes_X` rows each, then rows of no
    expert): impl "ragged" or "blocked" (module docstring); weights: (gate, up, down) ExpertWeights."""
    ffn = {"ragged": _ffn_ragged, "blocked": _ffn_blocked}[impl]
    return ffn(x_MxE, group_sizes_X, expert_of_M, weights, act)


def dense_expert_ffn(x_TxE, top_idx_TxK, top_w_TxK, weights, act):
    """sum_k w_k FFN_{idx_k}(x) by running every token through every expert (ids of no expert give 0)."""
    n_exp = weights[0].w.shape[0]

    def mm(x, ew):  # x [X, T, in], w [X, in, out]: the experts a batch dimension, each weight read in place
        y = jnp.einsum("xti,xio->xto", x, ew.w) if ew.scale is None else jax.vmap(int8_matmul)(x, ew.w, ew.scale)
        if ew.lora_a is None:
            return y
        xa = jnp.einsum("xti,xir->xtr", x, ew.lora_a.astype(x.dtype))
        return y + jnp.einsum("xtr,xro->xto", xa, ew.lora_b.astype(x.dtype))

    x_XxTxE = jnp.broadcast_to(x_TxE, (n_exp, *x_TxE.shape))
    y_XxTxE = _ffn(x_XxTxE, weights, act, mm)
    chosen_TxKxX = jax.nn.one_hot(top_idx_TxK, n_exp, dtype=y_XxTxE.dtype)  # id X (no expert): a row of zeros
    return jnp.einsum("tk,tkx,xte->te", top_w_TxK.astype(y_XxTxE.dtype), chosen_TxKxX, y_XxTxE)
