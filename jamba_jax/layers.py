"""Jamba's building blocks other than Mamba and MoE: RMSNorm, causal GQA attention, SwiGLU MLP.

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
from kernels import int8_matmul

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
        if self.has_variable("params", "kernel_scale"):  # ExpertsInt8-quantised dense MLP weight
            scale = self.get_variable("params", "kernel_scale")
            y = int8_matmul(x.astype(dtype).reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[0], -1),
                            scale.reshape(-1)).reshape(x.shape[:-1] + feats)
        else:
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


def make_attention_mask(valid_BxL, segment_ids_BxL=None):
    """Boolean [batch, q, k] mask: causal, keys must be real tokens, and (packed rows) same segment."""
    length = valid_BxL.shape[1]
    causal_QxK = jnp.tril(jnp.ones((length, length), dtype=bool))
    mask = causal_QxK[None] & valid_BxL[:, None, :]
    if segment_ids_BxL is not None:
        mask = mask & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    return mask


ATTN_BLOCK = 1024  # keys per block of the online-softmax path, used past 2 * ATTN_BLOCK keys


def dense_attention(q_BxQxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxQxS):
    """softmax(q k^T / sqrt(d)) v in float32, materialising [batch, heads, q, s]."""
    hd = q_BxQxKxGxD.shape[-1]
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q_BxQxKxGxD, k_BxSxKxD) * (hd ** -0.5)
    # A finite minimum (not -inf) keeps fully masked rows (left padding) free of NaN.
    logits = jnp.where(mask_BxQxS[:, None, None], logits.astype(_F32), jnp.finfo(_F32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxD.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v_BxSxKxD)


def blockwise_attention(q_BxQxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxQxS, block: int, live_blocks=None):
    """The same attention with an online softmax over key blocks (memory-efficient attention, Rabe &
    Staats 2021; FlashAttention's recurrence): memory O(q x block) instead of O(q x s).

    live_blocks: a (traced) count of leading key blocks that can hold unmasked keys; later blocks
    are skipped (causal prefill and decoding from a long cache). None visits every block.
    """
    b, s, nkv, hd = k_BxSxKxD.shape
    pad = (-s) % block
    if pad:
        k_BxSxKxD = jnp.pad(k_BxSxKxD, [(0, 0), (0, pad), (0, 0), (0, 0)])
        v_BxSxKxD = jnp.pad(v_BxSxKxD, [(0, 0), (0, pad), (0, 0), (0, 0)])
        mask_BxQxS = jnp.pad(mask_BxQxS, [(0, 0), (0, 0), (0, pad)])
    n_blocks = (s + pad) // block
    q32 = q_BxQxKxGxD.astype(_F32) * (hd ** -0.5)
    lowest = jnp.finfo(_F32).min
    q_len, groups = q_BxQxKxGxD.shape[1], q_BxQxKxGxD.shape[3]

    def body(j, carry):
        m, denom, acc = carry  # running max [b, K, G, q], softmax denominator (same), output [b, q, K, G, d]
        kb = jax.lax.dynamic_slice_in_dim(k_BxSxKxD, j * block, block, axis=1).astype(_F32)
        vb = jax.lax.dynamic_slice_in_dim(v_BxSxKxD, j * block, block, axis=1).astype(_F32)
        mb = jax.lax.dynamic_slice_in_dim(mask_BxQxS, j * block, block, axis=2)
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


class Attention(nn.Module):
    """Causal grouped-query attention with no positional embedding (the Jamba paper's choice).

    With `kv_cache` ({"k", "v": [batch, max_length, kv_heads, head_dim]}), the chunk's keys and
    values are written at `index` and the queries attend over the whole cache (the mask says which
    slots are real and causal); returns (y, updated cache). Without it, returns (y, None).
    """

    cfg: JambaConfig

    @nn.compact
    def __call__(self, x_BxLxE, mask_BxQxK, kv_cache=None, index=None):
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, length, _ = x_BxLxE.shape
        q = Dense(nh * hd, ("embed", "q_heads"), cfg, name="q_proj")(x_BxLxE)
        k = Dense(nkv * hd, ("embed", "kv_heads"), cfg, name="k_proj")(x_BxLxE)
        v = Dense(nkv * hd, ("embed", "kv_heads"), cfg, name="v_proj")(x_BxLxE)
        groups = nh // nkv
        q_BxLxKxGxD = q.reshape(b, length, nkv, groups, hd)
        k_BxSxKxD = k.reshape(b, length, nkv, hd)
        v_BxSxKxD = v.reshape(b, length, nkv, hd)
        new_cache = None
        if kv_cache is not None:
            start = (0, index, 0, 0)
            k_BxSxKxD = jax.lax.dynamic_update_slice(kv_cache["k"], k_BxSxKxD.astype(kv_cache["k"].dtype), start)
            v_BxSxKxD = jax.lax.dynamic_update_slice(kv_cache["v"], v_BxSxKxD.astype(kv_cache["v"].dtype), start)
            new_cache = {"k": k_BxSxKxD, "v": v_BxSxKxD}
            k_BxSxKxD, v_BxSxKxD = k_BxSxKxD.astype(q.dtype), v_BxSxKxD.astype(q.dtype)
        if k_BxSxKxD.shape[1] > 2 * ATTN_BLOCK:
            live = None if index is None else (index + length + ATTN_BLOCK - 1) // ATTN_BLOCK
            out_BxLxKxGxD = blockwise_attention(q_BxLxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxQxK, ATTN_BLOCK, live)
        else:
            out_BxLxKxGxD = dense_attention(q_BxLxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxQxK)
        out = out_BxLxKxGxD.astype(cfg.compute_dtype).reshape(b, length, nh * hd)
        return Dense(cfg.hidden_size, ("q_heads", "embed"), cfg, name="o_proj")(out), new_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    cfg: JambaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = Dense(cfg.intermediate_size, ("embed", "mlp"), cfg, name="gate_proj")(x)
        up = Dense(cfg.intermediate_size, ("embed", "mlp"), cfg, name="up_proj")(x)
        return Dense(cfg.hidden_size, ("mlp", "embed"), cfg, name="down_proj")(activation(cfg.hidden_act)(gate) * up)
