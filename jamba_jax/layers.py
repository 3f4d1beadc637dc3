"""Jamba's building blocks other than Mamba: RMSNorm, causal GQA attention, SwiGLU MLP, MoE.

Each follows transformers' modeling_jamba.py operation for operation (so float32 logits agree to
1e-4); every parameter carries logical axis names for the mesh rules in `jamba_jax.sharding`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jamba_jax.config import JambaConfig

_F32 = jnp.float32


def normal_init(cfg: JambaConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


def activation(name: str):
    return {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}[name]


class Dense(nn.Module):
    """y = x @ kernel (+ bias), contracting x's last axis; kernel [in, *features] with logical axes."""

    features: int | Sequence[int]
    axes: tuple[str | None, ...]  # logical names of the kernel's axes (in, *features)
    cfg: JambaConfig
    use_bias: bool = False
    kernel_init: Any = None

    @nn.compact
    def __call__(self, x):
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        init = self.kernel_init or normal_init(self.cfg)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                            (x.shape[-1],) + feats, self.cfg.weights_dtype)
        dtype = self.cfg.compute_dtype
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=((x.ndim - 1,), (0,)))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              feats, self.cfg.weights_dtype)
            y = y + bias.astype(dtype)
        return y


class RMSNorm(nn.Module):
    """x / rms(x) computed in float32, cast back to the input dtype, then times the weight."""

    cfg: JambaConfig
    axis_name: str | None = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.cfg.weights_dtype)
        x32 = x.astype(_F32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return scale.astype(self.cfg.compute_dtype) * x32.astype(x.dtype)


def attention_mask(valid_BxL, segment_ids_BxL=None):
    """Boolean [batch, q, k] mask: causal, keys must be real tokens, and (packed rows) same segment."""
    length = valid_BxL.shape[1]
    causal_QxK = jnp.tril(jnp.ones((length, length), dtype=bool))
    mask = causal_QxK[None] & valid_BxL[:, None, :]
    if segment_ids_BxL is not None:
        mask = mask & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    return mask


class Attention(nn.Module):
    """Causal grouped-query attention with no positional embedding (the Jamba paper's choice)."""

    cfg: JambaConfig

    @nn.compact
    def __call__(self, x_BxLxE, mask_BxQxK):
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, length, _ = x_BxLxE.shape
        q = Dense(nh * hd, ("embed", "q_heads"), cfg, name="q_proj")(x_BxLxE)
        k = Dense(nkv * hd, ("embed", "kv_heads"), cfg, name="k_proj")(x_BxLxE)
        v = Dense(nkv * hd, ("embed", "kv_heads"), cfg, name="v_proj")(x_BxLxE)
        groups = nh // nkv
        q_BxLxKxGxD = q.reshape(b, length, nkv, groups, hd)
        k_BxLxKxD = k.reshape(b, length, nkv, hd)
        v_BxLxKxD = v.reshape(b, length, nkv, hd)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q_BxLxKxGxD, k_BxLxKxD) * (hd ** -0.5)
        # A finite minimum (not -inf) keeps fully masked rows (left padding) free of NaN.
        logits = jnp.where(mask_BxQxK[:, None, None], logits.astype(_F32), jnp.finfo(_F32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
        out_BxLxKxGxD = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_BxLxKxD)
        out = out_BxLxKxGxD.reshape(b, length, nh * hd)
        return Dense(cfg.hidden_size, ("q_heads", "embed"), cfg, name="o_proj")(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    cfg: JambaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = Dense(cfg.intermediate_size, ("embed", "mlp"), cfg, name="gate_proj")(x)
        up = Dense(cfg.intermediate_size, ("embed", "mlp"), cfg, name="up_proj")(x)
        return Dense(cfg.hidden_size, ("mlp", "embed"), cfg, name="down_proj")(activation(cfg.hidden_act)(gate) * up)


class Experts(nn.Module):
    """Stacked SwiGLU experts applied dropless to tokens sorted by expert (a grouped matmul).

    Routing follows MaxText's permute -> `jax.lax.ragged_dot` -> unpermute: every (token, choice)
    pair is computed, none is dropped, and no [tokens, num_experts, ...] tensor is built.
    """

    cfg: JambaConfig

    @nn.compact
    def __call__(self, x_TxE, top_idx_TxK, top_w_TxK):
        cfg = self.cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        dtype = cfg.compute_dtype

        def weight(name, shape, axes):
            w = self.param(name, nn.with_logical_partitioning(normal_init(cfg), axes), shape, cfg.weights_dtype)
            return w.astype(dtype)

        w_gate = weight("gate_proj", (e, h, i), ("exp", "embed", "mlp"))
        w_up = weight("up_proj", (e, h, i), ("exp", "embed", "mlp"))
        w_down = weight("down_proj", (e, i, h), ("exp", "mlp", "embed"))

        t, k = top_idx_TxK.shape
        expert_of_M = top_idx_TxK.reshape(-1)  # M = t * k (token, choice) pairs
        order_M = jnp.argsort(expert_of_M, stable=True)
        token_of_M = order_M // k
        group_sizes = jnp.bincount(expert_of_M, length=e).astype(jnp.int32)
        x_MxE = x_TxE.astype(dtype)[token_of_M]
        gate = jax.lax.ragged_dot(x_MxE, w_gate, group_sizes)
        up = jax.lax.ragged_dot(x_MxE, w_up, group_sizes)
        y_MxE = jax.lax.ragged_dot(activation(cfg.hidden_act)(gate) * up, w_down, group_sizes)
        y_MxE = y_MxE * top_w_TxK.reshape(-1)[order_M][:, None].astype(dtype)
        return jnp.zeros((t, h), dtype).at[token_of_M].add(y_MxE)


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
