"""FlashAttention's forward pass as Pallas kernels (Mosaic TPU and Triton GPU), for `common.attention`.

Layout (the "rows" of `common.attention`; H kv heads, G query heads per kv head, D head dim, S keys): the
G query heads that share a kv head are folded into the query rows, so one [rows, keys] matmul serves all
of them:

  q    [B, H, Lr, D]  Lr = L * G rows in (query, head) order, already scaled by 1/sqrt(D)
  k, v [B, H, S, D]
  out  [B, H, Lr, D]  softmax(q k^T) v; and, when the caller differentiates, lse [B, H, Lr] float32

Which keys a row sees is computed per [rows, keys] block from O(L + S) inputs, never as an [L, S]
array: key validity [B, S] (left padding, unwritten cache slots), causal positions (query l sits at
position `q_offset + l`, as every `AttentionMask` constructor builds them; key s at position s) and,
for packed rows, segment ids (per row [B, Lr], per key [B, S]). Key blocks a query block cannot see
(past its last position, or outside the range of keys any row holds) are skipped: on TPU the grid
step does no work and its index map repeats the previous block so no copy is issued; on GPU the
program's loop runs only over the visible range.

  tpu  grid (B, H, query blocks, key blocks), the key axis sequential ("arbitrary") with the running
       max, denominator and accumulator in VMEM scratch (Mosaic's layout rules: rows a multiple of 8,
       keys of 128, D the full head dim; per-row values kept 128 lanes wide as in JAX's own TPU
       flash-attention kernel). The scalars (offset, visible key-block range) are prefetched to SMEM
       and steer the index maps.
  gpu  Triton: one program per (B, H, query block) walking its visible key blocks with the state in
       registers and K, V left in HBM (Mosaic GPU would stage whole blocks through shared memory and
       needs warpgroup layouts; the Triton backend lowers under jax 0.10 and 0.11). Blocks are powers
       of two, at least 16 (Triton's dot).

The backward pass is not a kernel: `common.attention` differentiates through its XLA blockwise
backward (FlashAttention-2's, recomputing probabilities from the saved lse), which these kernels'
lse feeds.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from kernels.blocks import pow2, precision, round_up

_F32 = jnp.float32
_LOWEST = float(jnp.finfo(_F32).min)
LANES = 128
TPU_ROWS, TPU_KEYS = 512, 512  # rows (queries x G) and keys per block
GPU_ROWS, GPU_KEYS = 128, 64
GPU_WARPS, GPU_STAGES = 4, 2


class Plan(NamedTuple):
    """Static tiling: `bq` queries (so bq * g rows) and `bk` keys per block."""

    bq: int
    bk: int
    nq: int
    nk: int
    g: int

    @property
    def rows(self) -> int:
        return self.bq * self.g


def unsupported(family: str, g: int, d: int) -> str | None:
    """Why the `family` kernel cannot run heads of G rows and head dim D (None: it can)."""
    if g & (g - 1):
        return f"query heads per kv head ({g}) not a power of two"
    if family == "gpu" and (d < 16 or d & (d - 1)):
        return f"head dim {d} not a power of two >= 16 (Triton's dot)"
    if family == "tpu" and d % LANES and d > LANES:
        return f"head dim {d} neither <= 128 nor a multiple of 128"
    return None


def plan(family: str, q_len: int, k_len: int, g: int) -> Plan:
    """Blocks inside the family's rules: TPU rows a multiple of 8 and keys of 128; GPU both powers of two >= 16."""
    if family == "tpu":
        bq = min(max(TPU_ROWS // g, 8), round_up(q_len, 8))
        bk = min(TPU_KEYS, round_up(k_len, LANES))
    else:
        bq = min(max(GPU_ROWS // g, 1), max(pow2(q_len), -(-16 // g)))
        bk = min(GPU_KEYS, max(16, pow2(k_len)))
    return Plan(bq, bk, -(-q_len // bq), -(-k_len // bk), g)


def _block_range(sc, i, p: Plan, causal: bool):
    """[lo, hi] key blocks query block i may see: the scalars hold (q_offset, first, last key block)."""
    hi = sc[2]
    if causal:
        hi = jnp.minimum(hi, (sc[0] + (i + 1) * p.bq - 1) // p.bk)
    return sc[1], hi


def _visible(s_RxK, q_start, k_start, kvalid_1xK, qseg, kseg, p: Plan, causal: bool, offset):
    """Scores with invisible keys set to the lowest float (rows are (query, head) pairs)."""
    ok = kvalid_1xK != 0
    if causal:
        rows = jax.lax.broadcasted_iota(jnp.int32, s_RxK.shape, 0)
        q_pos = offset + q_start + jax.lax.shift_right_logical(rows, (p.g.bit_length() - 1))
        k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, s_RxK.shape, 1)
        ok = ok & (k_pos <= q_pos)
    if qseg is not None:
        ok = ok & (qseg == kseg)
    return jnp.where(ok, s_RxK, _LOWEST)


# ------------------------------------------------------------------------------------------------
# TPU (Mosaic)
# ------------------------------------------------------------------------------------------------
def _lanes(x_Rx128, n: int):
    """A lane-replicated [R, 128] value widened or narrowed to [R, n]."""
    if n == LANES:
        return x_Rx128
    if n % LANES == 0:
        return jnp.tile(x_Rx128, (1, n // LANES))
    return x_Rx128[:, :n]


def _tpu_kernel(sc_ref, q_ref, k_ref, v_ref, kvalid_ref, *rest, p: Plan, causal: bool, segments: bool,
                with_lse: bool):
    qseg_ref, kseg_ref = (rest[0], rest[1]) if segments else (None, None)
    rest = rest[2:] if segments else rest
    o_ref, rest = rest[0], rest[1:]
    lse_ref, rest = (rest[0], rest[1:]) if with_lse else (None, rest)
    m_ref, l_ref, acc_ref = rest
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _LOWEST, _F32)
        l_ref[...] = jnp.zeros(l_ref.shape, _F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)

    lo, hi = _block_range(sc_ref, i, p, causal)

    @pl.when((j >= lo) & (j <= hi))
    def _():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32,
                                precision=precision(q.dtype))
        qseg = jnp.tile(qseg_ref[...], (1, p.bk // LANES)) if segments else None
        s = _visible(s, i * p.bq, j * p.bk, kvalid_ref[...], qseg, kseg_ref[...] if segments else None, p, causal,
                     sc_ref[0])
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [R, 128]
        pr = jnp.exp(s - _lanes(m_next, p.bk))
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_prev + jnp.sum(pr, axis=1)[:, None]
        m_ref[...] = m_next
        pv = jnp.dot(pr.astype(v.dtype), v, preferred_element_type=_F32, precision=precision(v.dtype))
        acc_ref[...] = acc_ref[...] * _lanes(alpha, acc_ref.shape[1]) + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        denom = l_ref[...]
        seen = denom > 0
        safe = jnp.where(seen, denom, 1.0)
        o_ref[...] = (acc_ref[...] / _lanes(safe, acc_ref.shape[1])).astype(o_ref.dtype)
        if with_lse:
            lse = jnp.where(seen, m_ref[...] + jnp.log(safe), _LOWEST)
            lse_ref[...] = lse[:, :1]


def tpu_vmem_bytes(p: Plan, d: int, itemsize: int, segments: bool) -> int:
    """Double-buffered q, k, v, key-mask and output blocks, the [R, bk] scores and probabilities and
    the float32 scratch: VMEM one program holds."""
    r = p.rows
    blocks = r * d * itemsize + 2 * p.bk * d * itemsize + 8 * p.bk * 4 * (2 if segments else 1) + r * d * 4
    if segments:
        blocks += r * LANES * 4
    return 2 * blocks + 2 * r * p.bk * 4 + 2 * r * LANES * 4 + r * max(d, LANES) * 4


def _tpu(q, k, v, kvalid, qseg, kseg, scalars, p: Plan, causal: bool, with_lse: bool, out_dtype, interpret):
    b, nkv, lr, d = q.shape
    r = p.rows
    segments = qseg is not None

    def kv_block(bi, h, i, j, sc):
        lo, hi = _block_range(sc, i, p, causal)
        return bi, h, jnp.clip(j, lo, jnp.maximum(hi, lo)), 0

    def key_row(bi, h, i, j, sc):
        return bi, 0, kv_block(bi, h, i, j, sc)[2]

    in_specs = [pl.BlockSpec((None, None, r, d), lambda bi, h, i, j, sc: (bi, h, i, 0)),
                pl.BlockSpec((None, None, p.bk, d), kv_block), pl.BlockSpec((None, None, p.bk, d), kv_block),
                pl.BlockSpec((None, 1, p.bk), key_row)]
    args = [q, k, v, kvalid[:, None, :].astype(jnp.int32)]
    if segments:
        in_specs += [pl.BlockSpec((None, r, LANES), lambda bi, h, i, j, sc: (bi, i, 0)),
                     pl.BlockSpec((None, 1, p.bk), key_row)]
        args += [jnp.broadcast_to(qseg.astype(jnp.int32)[:, :, None], (b, lr, LANES)),
                 kseg[:, None, :].astype(jnp.int32)]
    out_specs = [pl.BlockSpec((None, None, r, d), lambda bi, h, i, j, sc: (bi, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, nkv, lr, d), out_dtype)]
    if with_lse:
        out_specs.append(pl.BlockSpec((None, None, r, 1), lambda bi, h, i, j, sc: (bi, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, nkv, lr, 1), _F32))
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, p=p, causal=causal, segments=segments, with_lse=with_lse),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, nkv, p.nq, p.nk), in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((r, LANES), _F32), pltpu.VMEM((r, LANES), _F32),
                            pltpu.VMEM((r, d), _F32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="flash_attention_fwd_tpu",
    )(scalars, *args)
    return out[0], (out[1][..., 0] if with_lse else None)


# ------------------------------------------------------------------------------------------------
# GPU (Triton)
# ------------------------------------------------------------------------------------------------
def _gpu_kernel(sc_ref, q_ref, k_ref, v_ref, kvalid_ref, *rest, p: Plan, causal: bool, segments: bool,
                with_lse: bool):
    qseg_ref, kseg_ref = (rest[0], rest[1]) if segments else (None, None)
    rest = rest[2:] if segments else rest
    o_ref = rest[0]
    lse_ref = rest[1] if with_lse else None
    i = pl.program_id(2)
    offset, first, last = sc_ref[0], sc_ref[1], sc_ref[2]
    lo, hi = _block_range((offset, first, last), i, p, causal)
    q = q_ref[...]
    qseg = qseg_ref[...][:, None] if segments else None
    r, d = q.shape

    def body(j, carry):
        m, denom, acc = carry
        keys = pl.ds(j * p.bk, p.bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32,
                                precision=precision(q.dtype))
        s = _visible(s, i * p.bq, j * p.bk, kvalid_ref[keys][None, :], qseg,
                     kseg_ref[keys][None, :] if segments else None, p, causal, offset)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        pr = jnp.exp(s - m_next[:, None])
        alpha = jnp.exp(m - m_next)
        pv = jnp.dot(pr.astype(v.dtype), v, preferred_element_type=_F32, precision=precision(v.dtype))
        return m_next, alpha * denom + jnp.sum(pr, axis=1), acc * alpha[:, None] + pv

    init = (jnp.full((r,), _LOWEST, _F32), jnp.zeros((r,), _F32), jnp.zeros((r, d), _F32))
    m, denom, acc = jax.lax.fori_loop(lo, jnp.maximum(hi + 1, lo), body, init)
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    if with_lse:
        lse_ref[...] = jnp.where(seen, m + jnp.log(safe), _LOWEST)


def _gpu(q, k, v, kvalid, qseg, kseg, scalars, p: Plan, causal: bool, with_lse: bool, out_dtype, interpret):
    b, nkv, lr, d = q.shape
    s_len = k.shape[2]
    r = p.rows
    segments = qseg is not None
    rows = pl.BlockSpec((None, None, r, d), lambda bi, h, i: (bi, h, i, 0))
    keys = pl.BlockSpec((None, None, s_len, d), lambda bi, h, i: (bi, h, 0, 0))
    key_row = pl.BlockSpec((None, s_len), lambda bi, h, i: (bi, 0))
    in_specs = [pl.BlockSpec((8,), lambda bi, h, i: (0,)), rows, keys, keys, key_row]
    args = [jnp.pad(scalars, (0, 8 - scalars.shape[0])), q, k, v, kvalid.astype(jnp.int32)]
    if segments:
        in_specs += [pl.BlockSpec((None, r), lambda bi, h, i: (bi, i)), key_row]
        args += [qseg.astype(jnp.int32), kseg.astype(jnp.int32)]
    out_specs = [rows]
    out_shape = [jax.ShapeDtypeStruct((b, nkv, lr, d), out_dtype)]
    if with_lse:
        out_specs.append(pl.BlockSpec((None, None, r), lambda bi, h, i: (bi, h, i)))
        out_shape.append(jax.ShapeDtypeStruct((b, nkv, lr), _F32))
    out = pl.pallas_call(
        functools.partial(_gpu_kernel, p=p, causal=causal, segments=segments, with_lse=with_lse),
        grid=(b, nkv, p.nq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=GPU_WARPS, num_stages=GPU_STAGES),
        interpret=interpret,
        name="flash_attention_fwd_gpu",
    )(*args)
    return out[0], (out[1] if with_lse else None)


FAMILIES = {"tpu": _tpu, "gpu": _gpu}


def flash_attention_rows(family: str, q_rows, k, v, kvalid, q_offset, first_block, last_block, p: Plan, *,
                         causal: bool, q_segment_rows=None, k_segment=None, with_lse: bool = False, out_dtype=None,
                         interpret: bool = False):
    """The forward kernel of `family` on padded inputs in the rows layout (module docstring).

    q_rows [B, H, nq * bq * g, D] (scaled); k, v [B, H, nk * bk, D]; kvalid [B, nk * bk]; q_offset the
    first query's position (causal); [first_block, last_block] the key blocks holding any valid key.
    Returns (out [B, H, Lr, D] in out_dtype (default q's), lse [B, H, Lr] float32 or None).
    """
    scalars = jnp.stack([jnp.asarray(x, jnp.int32) for x in (q_offset, first_block, last_block)])
    return FAMILIES[family](q_rows, k, v, kvalid, q_segment_rows, k_segment, scalars, p, causal, with_lse,
                            out_dtype or q_rows.dtype, interpret)
