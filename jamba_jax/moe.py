"""Jamba's mixture of experts: a float32 router softmax over all experts, top-k without
renormalisation, and dropless SwiGLU experts (transformers' JambaSparseMoeBlock), plus the Switch
load-balancing loss.

Tokens are permuted so that each expert's tokens are contiguous, run through a grouped matmul, and
unpermuted (MaxText's plan). The grouped matmul has two implementations with the same result:
  ragged   `jax.lax.ragged_dot`: what GPU and TPU lower to a real grouped GEMM;
  blocked  rows padded per expert to whole blocks of `block` rows, then one `lax.map` over blocks,
           each a dense [block, hidden] @ [hidden, ffn] with its expert's weights. XLA:CPU lowers
           ragged_dot to a dense product over all experts (num_experts x the work), so the CPU
           uses this. Padding adds at most num_experts * (block - 1) rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jamba_jax.config import JambaConfig
from jamba_jax.layers import Dense, activation, normal_init
from kernels.int8_matmul import int8_matmul

_F32 = jnp.float32


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
    dest_M = padded_start_E[expert_of_M] + (jnp.arange(m) - start_E[expert_of_M])
    x_pad = jnp.zeros((n_blocks * blk, h), x_MxH.dtype).at[dest_M].set(x_MxH)
    padded_end_E = jnp.cumsum(padded_E)
    block_expert = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(n_blocks) * blk, side="right"), e - 1)

    def mm(x, w, s, ex):
        return x @ w[ex] if s is None else int8_matmul(x, w[ex], s[ex])

    sg, su, sd = scales or (None, None, None)

    def one_block(args):
        xb, ex = args
        return mm(act(mm(xb, w_gate, sg, ex)) * mm(xb, w_up, su, ex), w_down, sd, ex)

    y = jax.lax.map(one_block, (x_pad.reshape(n_blocks, blk, h), block_expert))
    return y.reshape(n_blocks * blk, -1)[dest_M]


FFN_IMPLS = {"ragged": _ffn_ragged, "blocked": _ffn_blocked}


def default_ffn_impl() -> str:
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


class Experts(nn.Module):
    """Stacked SwiGLU experts [num_experts, ...] applied dropless: every (token, choice) pair is
    computed, none is dropped, and no [tokens, num_experts, ...] tensor is built."""

    cfg: JambaConfig
    impl: str | None = None  # "ragged" | "blocked" | None (by backend)

    @nn.compact
    def __call__(self, x_TxH, top_idx_TxK, top_w_TxK):
        cfg = self.cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        dtype = cfg.compute_dtype

        quantized = self.has_variable("params", "gate_proj_scale")  # ExpertsInt8: int8 weights + scales

        def weight(name, shape, axes):
            w = self.param(name, nn.with_logical_partitioning(normal_init(cfg), axes), shape, cfg.weights_dtype)
            return w if quantized else w.astype(dtype)

        w_gate = weight("gate_proj", (e, h, i), ("exp", "embed", "mlp"))
        w_up = weight("up_proj", (e, h, i), ("exp", "embed", "mlp"))
        w_down = weight("down_proj", (e, i, h), ("exp", "mlp", "embed"))
        scales = None
        if quantized:
            scales = tuple(self.get_variable("params", f"{n}_scale") for n in ("gate_proj", "up_proj", "down_proj"))

        t, k = top_idx_TxK.shape
        expert_of_M = top_idx_TxK.reshape(-1)  # M = t * k (token, choice) pairs
        order_M = jnp.argsort(expert_of_M, stable=True)
        token_of_M = order_M // k
        group_sizes = jnp.bincount(expert_of_M, length=e).astype(jnp.int32)
        ffn = FFN_IMPLS[self.impl or default_ffn_impl()]
        y_MxH = ffn(x_TxH.astype(dtype)[token_of_M], group_sizes, expert_of_M[order_M], w_gate, w_up, w_down,
                    activation(cfg.hidden_act), scales)
        y_MxH = y_MxH * top_w_TxK.reshape(-1)[order_M][:, None].astype(dtype)
        return jnp.zeros((t, h), dtype).at[token_of_M].add(y_MxH)


class SparseMoE(nn.Module):
    """Router softmax over all experts in float32, top-k without renormalisation, then experts.

    Returns (y [batch, length, hidden], router_logits [batch, length, num_experts]).
    """

    cfg: JambaConfig

    @nn.compact
    def __call__(self, x_BxLxE):
        cfg = self.cfg
        b, length, h = x_BxLxE.shape
        router_logits = Dense(cfg.num_experts, ("embed", None), cfg, name="router")(x_BxLxE)
        probs = jax.nn.softmax(router_logits.astype(_F32), axis=-1)
        top_w, top_idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)
        y = Experts(cfg, name="experts")(x_BxLxE.reshape(-1, h), top_idx.reshape(b * length, -1),
                                         top_w.astype(cfg.compute_dtype).reshape(b * length, -1))
        return y.reshape(b, length, h), router_logits


def load_balancing_loss(router_logits: Sequence[jax.Array], num_experts: int, top_k: int,
                        valid_BxL: jax.Array | None = None) -> jax.Array:
    """Switch Transformer load-balancing loss over all MoE layers (transformers' formula).

    E * sum_e f_e * P_e with f_e the fraction of (token, choice) assignments to expert e and P_e the
    mean router probability of e, both over the real tokens of every MoE layer.
    """
    if not router_logits:
        return jnp.zeros((), _F32)
    counts = jnp.zeros((num_experts,), _F32)
    prob_sum = jnp.zeros((num_experts,), _F32)
    rows = 0.0
    for logits_BxLxX in router_logits:
        probs = jax.nn.softmax(logits_BxLxX.astype(_F32), axis=-1)
        _, top = jax.lax.top_k(probs, top_k)
        w = jnp.ones(probs.shape[:2], _F32) if valid_BxL is None else valid_BxL.astype(_F32)
        counts = counts + jnp.sum(jax.nn.one_hot(top, num_experts, dtype=_F32) * w[..., None, None], axis=(0, 1, 2))
        prob_sum = prob_sum + jnp.sum(probs * w[..., None], axis=(0, 1))
        rows = rows + jnp.sum(w)
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))
