"""y = x @ dequant(w): int8 weights with one float32 scale per output channel (ExpertsInt8).

The weight stays int8 in memory; it is converted to the activations' dtype inside the matmul and the
accumulator is scaled per output column, so activations never leave the compute dtype:

  xla     `(x @ w.astype(x.dtype)) * scale`: XLA fuses the convert into the dot's operand read.
  pallas  a Pallas kernel over (row tiles, column tiles): load an int8 tile, convert, multiply,
          scale the accumulator. Compiled on GPU/TPU, `interpret=True` on CPU.
  auto    xla on CPU, pallas on GPU/TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def int8_matmul_reference(x_MxK, w_KxN, scale_N):
    """The oracle: dequantise the whole weight in float32, then multiply."""
    return (x_MxK.astype(jnp.float32) @ (w_KxN.astype(jnp.float32) * scale_N.astype(jnp.float32))).astype(x_MxK.dtype)


def _xla(x_MxK, w_KxN, scale_N):
    acc = jnp.dot(x_MxK, w_KxN.astype(x_MxK.dtype), preferred_element_type=jnp.float32)
    return (acc * scale_N.astype(jnp.float32)).astype(x_MxK.dtype)


def _kernel(x_ref, w_ref, s_ref, o_ref):
    acc = jnp.dot(x_ref[...], w_ref[...].astype(x_ref.dtype), preferred_element_type=jnp.float32)
    o_ref[...] = (acc * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret"))
def _pallas(x_MxK, w_KxN, scale_N, block_m=128, block_n=128, interpret=False):
    m, k = x_MxK.shape
    n = w_KxN.shape[1]
    bm, bn = min(block_m, max(8, m)), min(block_n, n)
    mp, np_ = -(-m // bm) * bm, -(-n // bn) * bn
    x = jnp.pad(x_MxK, [(0, mp - m), (0, 0)])
    w = jnp.pad(w_KxN, [(0, 0), (0, np_ - n)])
    s = jnp.pad(scale_N.astype(jnp.float32), [(0, np_ - n)])[None, :]
    out = pl.pallas_call(
        _kernel,
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((1, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x_MxK.dtype),
        interpret=interpret,
    )(x, w, s)
    return out[:m, :n]


def int8_matmul(x_MxK, w_KxN, scale_N, impl: str = "auto"):
    """x [M, K] (compute dtype) @ int8 w [K, N] scaled by scale [N] -> [M, N] in x's dtype."""
    if w_KxN.dtype != jnp.int8:
        raise ValueError(f"int8_matmul needs an int8 weight; got {w_KxN.dtype}")
    if scale_N.shape != (w_KxN.shape[1],):
        raise ValueError(f"scale has shape {scale_N.shape}; expected one per output column {(w_KxN.shape[1],)}")
    if impl == "auto":
        impl = "xla" if jax.default_backend() == "cpu" else "pallas"
    if impl == "xla":
        return _xla(x_MxK, w_KxN, scale_N)
    if impl == "pallas":
        return _pallas(x_MxK, w_KxN, scale_N, interpret=jax.default_backend() == "cpu")
    raise ValueError(f"int8_matmul impl={impl!r}; expected 'auto', 'xla' or 'pallas'")
