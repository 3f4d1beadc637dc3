"""The Jamba Mamba mixer (Mamba-1 with RMSNorm on dt, B and C; Jamba paper, section 2).

x -> in_proj -> (x, z); x -> causal depthwise conv + SiLU -> x_proj -> (dt, B, C), each RMSNorm'd;
dt -> dt_proj (its bias and the softplus go into the scan); A = -exp(A_log);
y = selective_scan(x, dt, A, B, C, D, z) -> out_proj. Padding positions are zeroed before in_proj
and after the conv, exactly as transformers' JambaMambaMixer does, so left padding leaves the
real tokens' outputs unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.layers import activation, normal_init
from jamba_jax.config import JambaConfig
from jamba_jax.layers import dense, rms_norm
from jamba_jax.sequence_ops import sharded_causal_conv, sharded_selective_scan
from kernels import selective_state_update

_F32 = jnp.float32


def _dt_bias_init(dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """Mamba's dt init: softplus(bias) log-uniform in [dt_min, dt_max] (Gu & Dao, section 3.6)."""

    def init(key, shape, dtype=_F32):
        dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus

    return init


class MambaCache(NamedTuple):
    """A Mamba layer's state between chunks: the conv window and the SSM state."""

    conv: jax.Array  # [B, W - 1, I] (compute dtype): the last inputs of the causal conv
    ssm: jax.Array  # [B, I, N] float32


class MambaMixer(nn.Module):
    """Returns (y, new state). With `state` (a MambaCache) the chunk continues from it (cached
    generation, chunked prefill); without it the sequence starts from zeros and the new state is
    None."""

    cfg: JambaConfig

    @staticmethod
    def init_cache(cfg: JambaConfig, batch: int) -> MambaCache:
        return MambaCache(jnp.zeros((batch, cfg.mamba_d_conv - 1, cfg.mamba_d_inner), cfg.compute_dtype),
                          jnp.zeros((batch, cfg.mamba_d_inner, cfg.mamba_d_state), jnp.float32))

    def _dt_proj(self, dt_BxLxR):
        """(dt_BxLxR @ dt_proj, with a LoRA adapter's (dt A) B when the parameters hold one; dt_proj's bias,
        which the scan adds in float32)."""
        cfg, r, d_inner, pdtype = self.cfg, self.cfg.mamba_dt_rank, self.cfg.mamba_d_inner, self.cfg.weights_dtype
        dt_kernel_init = nn.initializers.uniform(scale=2 * r ** -0.5)
        dt_kernel = self.param("dt_proj_kernel", nn.with_logical_partitioning(
            lambda key, s, d: dt_kernel_init(key, s, d) - r ** -0.5, (None, "mamba_inner")), (r, d_inner), pdtype)
        dt_bias = self.param("dt_proj_bias", nn.with_logical_partitioning(_dt_bias_init(), ("mamba_inner",)),
                             (d_inner,), pdtype)
        dt = dt_BxLxR @ dt_kernel.astype(cfg.compute_dtype)  # [B, L, I]
        if self.has_variable("params", "dt_proj_kernel_lora_a"):  # LoRA adapters (jamba_jax.lora)
            a, b = (self.get_variable("params", f"dt_proj_kernel_lora_{x}").astype(cfg.compute_dtype) for x in "ab")
            dt = dt + (dt_BxLxR @ a) @ b
        return dt, dt_bias

    @nn.compact
    def __call__(self, x_BxLxE, valid_BxL=None, segment_ids_BxL=None, state=None):
        cfg = self.cfg
        d_inner, n, r, k = cfg.mamba_d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
        dtype, pdtype = cfg.compute_dtype, cfg.weights_dtype
        mask = None if valid_BxL is None else valid_BxL[..., None].astype(dtype)

        if mask is not None:
            x_BxLxE = x_BxLxE * mask
        xz = dense(cfg, (2, d_inner), ("embed", None, "mamba_inner"), "in_proj", use_bias=cfg.mamba_proj_bias)(x_BxLxE)
        x, z = xz[..., 0, :], xz[..., 1, :]  # [B, L, I] each

        init = normal_init(cfg.initializer_range)
        conv_kernel = self.param("conv_kernel", nn.with_logical_partitioning(init, ("conv", "mamba_inner")),
                                 (k, d_inner), pdtype).astype(dtype)
        conv_bias = None
        if cfg.mamba_conv_bias:
            conv_bias = self.param("conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mamba_inner",)),
                                   (d_inner,), pdtype).astype(dtype)
        x, conv_state = sharded_causal_conv(x, conv_kernel, conv_bias, None if state is None else state.conv,
                                            segment_ids_BxL)
        x = activation(cfg.hidden_act)(x)
        if mask is not None:
            x = x * mask

        dbc = dense(cfg, r + 2 * n, ("mamba_inner", None), "x_proj")(x)
        dt, B, C = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
        dt = rms_norm(cfg, "dt_layernorm", axis_name=None)(dt)
        B = rms_norm(cfg, "b_layernorm", axis_name=None)(B)
        C = rms_norm(cfg, "c_layernorm", axis_name=None)(C)
        dt, dt_bias = self._dt_proj(dt)

        a_log = self.param("A_log", nn.with_logical_partitioning(
            lambda key, s, d: jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=d), s)), ("mamba_inner", None)),
            (d_inner, n), pdtype)
        d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("mamba_inner",)),
                            (d_inner,), pdtype)
        A = -jnp.exp(a_log.astype(_F32))
        reset = None
        if segment_ids_BxL is not None:  # a packed document starts where the segment id changes
            reset = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], dtype=bool),
                                     segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
        if state is not None and x.shape[1] == 1:  # one decoding step: no scan machinery
            y, ssm_state = selective_state_update(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0],
                                                  D=d_skip.astype(_F32), z=z[:, 0], dt_bias=dt_bias.astype(_F32),
                                                  dt_softplus=True)
            y = y[:, None]
        else:
            y, ssm_state = sharded_selective_scan(
                dict(u=x, delta=dt, A=A, B=B, C=C, D=d_skip.astype(_F32), z=z, delta_bias=dt_bias.astype(_F32),
                     initial_state=None if state is None else state.ssm, reset=reset), cfg.scan_impl)
        out = dense(cfg, cfg.hidden_size, ("mamba_inner", "embed"), "out_proj",
                    use_bias=cfg.mamba_proj_bias)(y.astype(dtype))
        new_state = None if state is None else MambaCache(conv_state.astype(state.conv.dtype), ssm_state)
        return out, new_state
