"""Cumulative sums of a vector by one of two implementations with the same result (`cumsum(..., impl=)`):

  xla     `jnp.cumsum` (a reduce-window): what GPU and TPU run well.
  matmul  two small matmuls, within blocks of BLOCK values and then over the blocks' totals: what the CPU
          runs (XLA:CPU's reduce-window cumulative sum is the slower there, by a wide margin, at a few hundred
          values).
          Float32 matmuls only: TPU and GPU would run them in reduced precision by default.

Notation: N values.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.platform import current_platform

CUMSUM_IMPLS = ("auto", "xla", "matmul")
BLOCK = 32  # values per block of the matmul form


def cumsum_impl(impl: str) -> str:
    """`impl`, or for "auto": "matmul" on the CPU, "xla" on GPU and TPU."""
    if impl not in CUMSUM_IMPLS:
        raise ValueError(f"cumsum impl={impl!r}: expected one of {CUMSUM_IMPLS}")
    if impl != "auto":
        return impl
    return "matmul" if current_platform() == "cpu" else "xla"


def cumsum(x_N, impl: str = "auto"):
    """The cumulative sums [N] of x_N [N]."""
    if cumsum_impl(impl) == "xla":
        return jnp.cumsum(x_N)
    n = x_N.shape[0]
    rows = -(-n // BLOCK)
    x = jnp.pad(x_N, (0, rows * BLOCK - n)).reshape(rows, BLOCK)
    within = x @ jnp.triu(jnp.ones((BLOCK, BLOCK), x.dtype))
    before = jnp.tril(jnp.ones((rows, rows), x.dtype), -1) @ within[:, -1]
    return (within + before[:, None]).reshape(-1)[:n]
