"""Attention by the Pallas forward kernels of `kernels.flash_attention` (TPU and GPU; interpreted on a
CPU), differentiated through the blockwise path's backward (`blockwise.gradients`), which the kernel's
log-sum-exp feeds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from common.attention.blocks import Plan, key_block_range, pad_keys, padded_mask
from common.attention.blockwise import CORE_NAME, gradients
from common.attention.mask import F32, AttentionMask
from kernels import flash_attention
from kernels.platform import current_platform, interpret_mode


def _kernel_forward(q, k, v, mask: AttentionMask, family: str, interpret: bool, with_lse: bool):
    """The Pallas forward in the kernels' rows layout: (out [B, H, Lq * G, D], lse [B, H, Lq * G] or None, the
    scaled q rows, the plan, the padded mask)."""
    b, length, nkv, g, d = q.shape
    p = flash_attention.plan(family, length, k.shape[2], g)
    pmask = padded_mask(mask, p)
    lq = p.nq * p.bq
    q_rows = jnp.pad(q * jnp.asarray(d ** -0.5, q.dtype), [(0, 0), (0, lq - length), (0, 0), (0, 0), (0, 0)])
    q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(b, nkv, lq * g, d)
    first, last = key_block_range(pmask, p)
    causal = mask.q_pos is not None
    q_segment_rows = None if mask.q_segment is None else jnp.repeat(pmask.q_segment, g, axis=1)
    out, lse = flash_attention.flash_attention_rows(
        family, q_rows, pad_keys(k, p), pad_keys(v, p), pmask.k_valid, mask.q_pos[0] if causal else 0, first, last,
        p, causal=causal, q_segment_rows=q_segment_rows, k_segment=pmask.k_segment, with_lse=with_lse,
        out_dtype=F32 if with_lse else q.dtype, interpret=interpret)
    return out, lse, q_rows, p, pmask


def _from_kernel_rows(x_BxHxRxD, p: Plan):
    """[B, H, Q * R, ...] (the kernels' rows) -> [Q, B, H, R, ...] (the blockwise path's)."""
    b, nkv = x_BxHxRxD.shape[:2]
    x = x_BxHxRxD.reshape(b, nkv, p.nq, -1, *x_BxHxRxD.shape[3:])
    return jnp.moveaxis(x, 2, 0)


def _kernel_out(out, q):
    b, length, nkv, g, d = q.shape
    return out.reshape(b, nkv, -1, g, d).transpose(0, 2, 1, 3, 4)[:, :length].astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, mask, family, interpret):
    return _kernel_out(_kernel_forward(q, k, v, mask, family, interpret, with_lse=False)[0], q)


def _flash_fwd(q, k, v, mask, family, interpret):
    out, lse, q_rows, p, pmask = _kernel_forward(q, k, v, mask, family, interpret, with_lse=True)
    out, lse = checkpoint_name(out, CORE_NAME), checkpoint_name(lse, CORE_NAME)  # as the blockwise path's
    out_rows = _from_kernel_rows(out, p)
    return _kernel_out(out, q), (_from_kernel_rows(q_rows, p), k, v, pmask, out_rows, _from_kernel_rows(lse, p))


def _flash_bwd(family, interpret, residuals, dout):
    return gradients(residuals, dout, flash_attention.plan(family, dout.shape[1], residuals[1].shape[2],
                                                           dout.shape[3]))


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask, family: str | None = None):
    """Attention by the Pallas forward kernel of `family` ("tpu" or "gpu"; default: the platform traced
    for, the GPU body interpreted on a CPU), differentiable through the blockwise backward."""
    family = family or ("tpu" if current_platform() == "tpu" else "gpu")
    why = flash_attention.unsupported(family, q_BxLxHxGxD.shape[3], q_BxLxHxGxD.shape[4])
    if why:
        raise ValueError(f"attention impl='pallas' ({family} kernel): {why}; use impl='blockwise'")
    return _flash(q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask, family, interpret_mode())
