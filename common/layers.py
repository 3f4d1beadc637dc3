"""Leaf layers every model builds on. Each takes its dtypes explicitly (`dtype`: compute,
`param_dtype`: storage), as recurrentgemma's and MaxText's leaf layers do, and carries logical
axis names on its parameters for the mesh rules (`common.sharding`).

Shape suffixes used across common/ and the model packages (nanodo's habit; `x_BxLxE` is [B, L, E]):

  B batch          L length (queries, new tokens)   S keys (a cache's slots)   C a chunk of positions
  E model width    H kv heads (query heads: H x G)  G query heads per kv head  D head dim
  R rows of a query block (queries x G)             Q query blocks             V vocabulary
  F feed-forward width   I Mamba's d_inner   N Mamba's d_state   W Mamba's conv width (d_conv)
  X experts        K top-k choices   T tokens (B x L, flattened)   M (token, choice) pairs

The kernels (`kernels/`, after mamba_ssm's and the GEMM's notation) and active learning
(`active_learning/`: points, classes, features) state their own in their modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import int8_matmul

_F32 = jnp.float32

ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' ACT2FN["gelu"]: exact
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    return ACTIVATIONS[name]


def normal_init(stddev: float):
    return nn.initializers.normal(stddev=stddev)


class Dense(nn.Module):
    """y = x @ kernel (+ bias), contracting x's last axis; kernel [in, *features] with logical axes.

    An ExpertsInt8-quantised kernel (int8, beside a `kernel_scale` [prod(features)] parameter) is
    dequantised inside the matmul (`kernels.int8_matmul`): the presence of the scale in the
    parameters is the quantised flag, so one module serves both trees. Likewise LoRA adapters
    (`kernel_lora_a` [in, r], `kernel_lora_b` [r, *features], jamba_jax.lora) add (x A) B, with dropout of
    rate `lora_dropout` on x when the apply has a "dropout" rng (training).
    """

    features: int | Sequence[int]
    axes: tuple[str | None, ...]  # logical names of the kernel's axes (in, *features)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    use_bias: bool = False
    kernel_init: Any = nn.initializers.normal(stddev=0.02)
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x):
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1],) + feats, self.param_dtype)
        if self.has_variable("params", "kernel_scale"):
            scale = self.get_variable("params", "kernel_scale")
            y = int8_matmul(x.astype(self.dtype).reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[0], -1),
                            scale.reshape(-1)).reshape(x.shape[:-1] + feats)
        else:
            y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=((x.ndim - 1,), (0,)))
        if self.has_variable("params", "kernel_lora_a"):
            a, b = self.get_variable("params", "kernel_lora_a"), self.get_variable("params", "kernel_lora_b")
            if self.lora_dropout > 0 and self.has_rng("dropout"):
                x = nn.Dropout(self.lora_dropout)(x, deterministic=False)
            y = y + jnp.tensordot(x.astype(self.dtype) @ a.astype(self.dtype), b.astype(self.dtype), axes=1)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              feats, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """x / rms(x) computed in float32, cast back to the input dtype, then times the weight."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(_F32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(x.dtype)


def layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    """flax's LayerNorm with logically partitioned (replicated) scale and bias."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)
