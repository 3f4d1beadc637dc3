"""Block-size arithmetic and matmul precision shared by the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x."""
    return -(-x // m) * m


def pow2(x: int) -> int:
    """The smallest power of two >= x (Triton's block rule)."""
    return 1 << max(0, (x - 1).bit_length())


def precision(dtype):
    """Full float32 products for float32 operands (TPU and GPU default to bf16 / tf32 passes)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
