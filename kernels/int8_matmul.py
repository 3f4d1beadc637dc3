"""y = x @ dequant(w): int8 weights with one float32 scale per output channel (ExpertsInt8).

The weight stays int8 in memory; it is converted to the activations' dtype inside the matmul and the
accumulator is scaled per output column, so activations never leave the compute dtype:

  xla         `(x @ w.astype(x.dtype)) * scale`: XLA fuses the convert into the dot's operand read.
  pallas_tpu  Mosaic TPU kernel, grid (M / bm, N / bn, K / bk) with K sequential: each step loads
              an int8 [bk, bn] tile, converts it, multiplies into a float32 [bm, bn] VMEM
              accumulator; the last K step scales it and writes the output tile.
  pallas_gpu  Triton kernel, one program per [bm, bn] output tile walking K in [bk] slices with the
              float32 accumulator in registers (operands stay in HBM: no shared-memory budget to
              outgrow, and no Mosaic GPU warpgroup layouts needed for a plain `dot`).
  pallas      the family of the platform being traced for (`kernels.platform`); on a CPU the
              GPU family's body in interpret mode.
  auto        xla on CPU, pallas on GPU and TPU.

Every block fits both platforms' limits at any K: TPU blocks are (multiples of 32 or 16, of 128),
at most a few MiB of VMEM; Triton blocks are powers of two, at least 16 (its dot's minimum).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from kernels.blocks import pow2, precision, round_up
from kernels.platform import current_platform, interpret_mode

_F32 = jnp.float32
TPU_BLOCKS = (256, 512, 512)  # bm, bn, bk
GPU_BLOCKS = (64, 128, 64)
GPU_WARPS, GPU_STAGES = 4, 3


def int8_matmul_reference(x_MxK, w_KxN, scale_N):
    """The oracle: dequantise the whole weight in float32, then multiply."""
    return (x_MxK.astype(_F32) @ (w_KxN.astype(_F32) * scale_N.astype(_F32))).astype(x_MxK.dtype)


def _xla(x_MxK, w_KxN, scale_N):
    acc = jnp.dot(x_MxK, w_KxN.astype(x_MxK.dtype), preferred_element_type=_F32)
    return (acc * scale_N.astype(_F32)).astype(x_MxK.dtype)


def _pad2(x, rows, cols):
    return jnp.pad(x, [(0, rows - x.shape[0]), (0, cols - x.shape[1])])


# ------------------------------------------------------------------------------------------------
# TPU
# ------------------------------------------------------------------------------------------------
def _tpu_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jnp.dot(x_ref[...], w_ref[...].astype(x_ref.dtype), preferred_element_type=_F32,
                            precision=precision(x_ref.dtype))

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = (acc_ref[...] * s_ref[...]).astype(o_ref.dtype)


def tpu_blocks(m: int, k: int, n: int, dtype, blocks=TPU_BLOCKS):
    """(bm, bn, bk): bm a multiple of the activations' sublane packing (and of int8's 32 when it
    is the weight's row count), bn and bk multiples of 128."""
    bm, bn, bk = blocks
    rows = max(8 * (4 // jnp.dtype(dtype).itemsize), 8)
    return min(bm, round_up(m, rows)), min(bn, round_up(n, 128)), min(bk, round_up(k, 128))


def tpu_vmem_bytes(bm: int, bn: int, bk: int, itemsize: int) -> int:
    """Double-buffered x, w (int8), scale and output tiles plus the float32 accumulator."""
    return 2 * (bm * bk * itemsize + bk * bn + 8 * bn * 4 + bm * bn * itemsize) + bm * bn * 4


def pallas_tpu(x_MxK, w_KxN, scale_N, interpret, blocks=TPU_BLOCKS):
    m, k = x_MxK.shape
    n = w_KxN.shape[1]
    bm, bn, bk = tpu_blocks(m, k, n, x_MxK.dtype, blocks)
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
    out = pl.pallas_call(
        _tpu_kernel,
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)), pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
                  pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x_MxK.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="int8_matmul_tpu",
    )(_pad2(x_MxK, mp, kp), _pad2(w_KxN, kp, np_), _pad2(scale_N.astype(_F32)[None, :], 1, np_))
    return out[:m, :n]


# ------------------------------------------------------------------------------------------------
# GPU (Triton)
# ------------------------------------------------------------------------------------------------
def _gpu_kernel(x_ref, w_ref, s_ref, o_ref, *, bk, n_k):
    def body(kk, acc):
        x = x_ref[:, pl.ds(kk * bk, bk)]
        w = w_ref[pl.ds(kk * bk, bk), :].astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=_F32, precision=precision(x.dtype))

    acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, _F32))
    o_ref[...] = (acc * s_ref[...]).astype(o_ref.dtype)


def gpu_blocks(m: int, k: int, n: int, blocks=GPU_BLOCKS):
    bm, bn, bk = blocks
    return min(bm, max(16, pow2(m))), min(bn, max(16, pow2(n))), min(bk, max(16, pow2(k)))


def pallas_gpu(x_MxK, w_KxN, scale_N, interpret, blocks=GPU_BLOCKS):
    m, k = x_MxK.shape
    n = w_KxN.shape[1]
    bm, bn, bk = gpu_blocks(m, k, n, blocks)
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
    out = pl.pallas_call(
        functools.partial(_gpu_kernel, bk=bk, n_k=kp // bk),
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((1, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x_MxK.dtype),
        compiler_params=plt.CompilerParams(num_warps=GPU_WARPS, num_stages=GPU_STAGES),
        interpret=interpret,
        name="int8_matmul_gpu",
    )(_pad2(x_MxK, mp, kp), _pad2(w_KxN, kp, np_), _pad2(scale_N.astype(_F32)[None, :], 1, np_))
    return out[:m, :n]


IMPLS = ("auto", "xla", "pallas", "pallas_tpu", "pallas_gpu")


def int8_matmul(x_MxK, w_KxN, scale_N, impl: str = "auto"):
    """x [M, K] (compute dtype) @ int8 w [K, N] scaled by scale [N] -> [M, N] in x's dtype."""
    if w_KxN.dtype != jnp.int8:
        raise ValueError(f"int8_matmul needs an int8 weight; got {w_KxN.dtype}")
    if scale_N.shape != (w_KxN.shape[1],):
        raise ValueError(f"scale has shape {scale_N.shape}; expected one per output column {(w_KxN.shape[1],)}")
    if impl not in IMPLS:
        raise ValueError(f"int8_matmul impl={impl!r}; expected one of {IMPLS}")
    platform = current_platform()
    if impl == "auto":
        impl = "xla" if platform == "cpu" else "pallas"
    if impl == "pallas":
        impl = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    if impl == "xla":
        return _xla(x_MxK, w_KxN, scale_N)
    kernel = pallas_tpu if impl == "pallas_tpu" else pallas_gpu
    return kernel(x_MxK, w_KxN, scale_N, interpret_mode())
