"""The Mamba mixer's two operations along the sequence (the causal conv and the selective scan) under a
device mesh, with the token dimension whole or split over devices (context parallelism), exactly.

Channels (d_inner) are independent in both, so batch and channel shards need no communication. When
the rules split the tokens into contiguous slices (`common.sharding`: "length" -> `context`):

- conv: each slice receives the last d_conv - 1 inputs (and their segment ids) of the slice before it by
  one `ppermute` (the halo); the first slice gets the carried conv state (zeros for a fresh row). A packed
  document that starts inside the halo masks it as it does inside a slice.
- scan: h[t] = a[t] h[t-1] + b[t] is affine in the carried state, so a slice's final state is
  P * h_in + h_0, where h_0 is its final state from zeros and P the product of its decays
  exp(A * sum dt) (0 when a document starts in the slice: the reset cuts the carry). Each slice scans
  from zeros for (h_0, P), one all-gather shares them over the slices, and every slice folds those of
  the slices before it (an exclusive prefix, in slice order) into its true initial state. It then either
  scans again from that state ("rescan") or adds the state's contribution to the outputs it already has
  ("correction": y[t] += C[t] . (exp(A * sum_{s<=t} dt[s]) * h_in) up to the slice's first document
  start; computed a block of positions at a time). Gradients flow through the gather and the fold.

`benchmarks/context_parallel.py` measures the two carries; CARRY is the default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from common.sharding import axes_size, current_mesh, fitted_spec, spec_axes
from kernels import selective_scan
from kernels.selective_scan import prepare_delta, skip_and_gate

_F32 = jnp.float32
CARRY = "rescan"
CARRIES = ("rescan", "correction")
CORRECTION_BLOCK = 256  # positions per block of the correction's [batch, block, d_inner, d_state] product


def causal_depthwise_conv(x_BxLxI, kernel_WxI, bias_I=None, conv_state_BxWm1xI=None, segment_ids_BxL=None,
                          state_segment_ids_BxWm1=None):
    """out[t] = sum_j kernel[j] * x[t - (W-1) + j] (+ bias), with the W-1 inputs before the first
    taken from `conv_state` (zeros when None). With `segment_ids`, inputs of another segment (a
    previous packed document) are left out; the state's inputs count as the first token's segment unless
    `state_segment_ids` says theirs. Returns (out, the last W-1 inputs: the next state)."""
    w = kernel_WxI.shape[0]
    b, length, i = x_BxLxI.shape
    if conv_state_BxWm1xI is None:
        conv_state_BxWm1xI = jnp.zeros((b, w - 1, i), x_BxLxI.dtype)
    xp = jnp.concatenate([conv_state_BxWm1xI.astype(x_BxLxI.dtype), x_BxLxI], axis=1)  # [B, L + W - 1, I]
    if segment_ids_BxL is None:
        out = sum(xp[:, j:j + length] * kernel_WxI[j] for j in range(w))
    else:
        if state_segment_ids_BxWm1 is None:
            state_segment_ids_BxWm1 = jnp.repeat(segment_ids_BxL[:, :1], w - 1, axis=1)
        seg_p = jnp.concatenate([state_segment_ids_BxWm1, segment_ids_BxL], axis=1)
        out = sum(jnp.where((seg_p[:, j:j + length] == segment_ids_BxL)[..., None], xp[:, j:j + length], 0)
                  * kernel_WxI[j] for j in range(w))
    if bias_I is not None:
        out = out + bias_I
    return out, xp[:, length:]


def _seq_spec(shape):
    """(mesh, the PartitionSpec of a [batch, length, d_inner] activation) under the current mesh, or None."""
    mesh = current_mesh()
    return (mesh, fitted_spec(shape, ("batch", "length", "mamba_inner"), mesh)) if mesh is not None else None


def sharded_causal_conv(x_BxLxI, kernel_WxI, bias_I=None, conv_state_BxWm1xI=None, segment_ids_BxL=None):
    """`causal_depthwise_conv` under the current mesh; across token slices with the halo (module docstring)."""
    where = _seq_spec(x_BxLxI.shape)
    if where is None or where[1][1] is None:
        return causal_depthwise_conv(x_BxLxI, kernel_WxI, bias_I, conv_state_BxWm1xI, segment_ids_BxL)
    mesh, (bs, ls, ds) = where
    axes, w = spec_axes(ls), kernel_WxI.shape[0]
    n = axes_size(mesh, axes)
    args = {"x": x_BxLxI, "kernel": kernel_WxI, "bias": bias_I, "state": conv_state_BxWm1xI, "seg": segment_ids_BxL}
    args = {k: v for k, v in args.items() if v is not None}
    specs = {"x": P(bs, ls, ds), "kernel": P(None, ds), "bias": P(ds), "state": P(bs, None, ds), "seg": P(bs, ls)}

    def body(a):
        first = jax.lax.axis_index(axes) == 0
        shift = [(i, i + 1) for i in range(n - 1)]  # slice i's tail to slice i + 1; the first slice receives zeros
        halo = jax.lax.ppermute(a["x"][:, -(w - 1):], axes, shift)
        if "state" in a:
            halo = jnp.where(first, a["state"].astype(halo.dtype), halo)
        halo_seg = None
        if "seg" in a:
            own = jnp.repeat(a["seg"][:, :1], w - 1, axis=1)
            halo_seg = jnp.where(first, own, jax.lax.ppermute(a["seg"][:, -(w - 1):], axes, shift))
        return causal_depthwise_conv(a["x"], a["kernel"], a.get("bias"), halo, a.get("seg"), halo_seg)

    out, tails = jax.shard_map(body, mesh=mesh, in_specs=({k: specs[k] for k in args},),
                               out_specs=(P(bs, ls, ds), P(bs, ls, ds)), check_vma=False)(args)
    return out, tails[:, -(w - 1):]  # the last slice's tail: the row's next conv state


# where selective_scan's arguments have their batch ("b"), length ("l") and d_inner ("d") dimensions
_SCAN_DIMS = {"u": "bld", "delta": "bld", "A": "d.", "B": "bl.", "C": "bl.", "D": "d", "z": "bld",
              "delta_bias": "d", "initial_state": "bd.", "reset": "bl"}


def sharded_selective_scan(args: dict, impl: str, carry: str | None = None):
    """(y, final state) of `kernels.selective_scan(**args, delta_softplus=True)`; under a multi-device mesh,
    one `jax.shard_map` over batch, token and d_inner shards: every device scans its own slice (a Pallas kernel
    runs per device, unpartitioned), and token slices carry the state across them (`carry`, default CARRY read
    at trace time: module docstring)."""
    args = {k: v for k, v in args.items() if v is not None}
    carry = carry or CARRY
    where = _seq_spec(args["u"].shape)
    if where is None:
        return selective_scan(**args, delta_softplus=True, return_final_state=True, impl=impl)
    mesh, (bs, ls, ds) = where
    specs = {k: P(*({"b": bs, "l": ls, "d": ds}.get(c) for c in _SCAN_DIMS[k])) for k in args}

    def body(a):
        if ls is None:
            return selective_scan(**a, delta_softplus=True, return_final_state=True, impl=impl)
        return carried_scan(a, impl, spec_axes(ls), axes_size(mesh, spec_axes(ls)), carry)

    # check_vma=False: the kernels start their carries from fresh zeros, which the varying-axes
    # check would want cast; the collectives of the carry are explicit
    return jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=(P(bs, ls, ds), P(bs, ds, None)),
                         check_vma=False)(args)


def _slice_decay(a):
    """[b, d, n] float32: the product over the slice of exp(dt A), or 0 where a document starts in it."""
    dt = prepare_delta(a["delta"], a.get("delta_bias"), delta_softplus=True)  # [b, L, d]
    decay = jnp.exp(jnp.sum(dt, axis=1)[..., None] * a["A"].astype(_F32))
    if "reset" in a:
        decay = jnp.where(jnp.any(a["reset"], axis=1)[:, None, None], 0.0, decay)
    return decay


def carried_scan(a: dict, impl: str, axes: tuple[str, ...], n: int, carry: str):
    """Inside the shard_map: this token slice's (y, the row's final state), its initial state carried in from the
    slices before it (module docstring)."""
    if carry not in CARRIES:
        raise ValueError(f"carry={carry!r}: expected one of {CARRIES}")
    a = dict(a)
    h_in = a.pop("initial_state", None)  # the row's state before the first slice
    gate = {k: a.pop(k) for k in ("D", "z") if k in a}
    y0, h0 = selective_scan(**a, delta_softplus=True, return_final_state=True, impl=impl)
    decays = jax.lax.all_gather(_slice_decay(a), axes)  # [slices, b, d, n]
    finals = jax.lax.all_gather(h0, axes)
    states = [jnp.zeros_like(h0) if h_in is None else h_in.astype(_F32)]
    for j in range(n):  # states[j]: the true state entering slice j
        states.append(decays[j] * states[-1] + finals[j])
    start = jnp.stack(states[:-1])[jax.lax.axis_index(axes)]
    if carry == "rescan":
        y = selective_scan(**a, **gate, initial_state=start, delta_softplus=True, impl=impl)
    else:
        y = skip_and_gate(y0 + _correction(a, start).astype(y0.dtype), a["u"], gate.get("D"), gate.get("z"))
    return y, states[-1]


def _correction(a, start_BxDxN):
    """[b, L, d] float32: C[t] . (exp(A * sum_{s<=t} dt[s]) * start) before the slice's first document start,
    a block of CORRECTION_BLOCK positions at a time."""
    cum = jnp.cumsum(prepare_delta(a["delta"], a.get("delta_bias"), delta_softplus=True), axis=1)  # [b, L, d]
    b, length, d = cum.shape
    alive = jnp.ones((b, length), bool) if "reset" not in a else jnp.cumsum(a["reset"], axis=1) == 0
    blk = min(CORRECTION_BLOCK, length)
    pad = -length % blk
    blocks = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(b, -1, blk, *x.shape[2:]).swapaxes(0, 1)
              for x in (cum, a["C"].astype(_F32), alive)]
    A = a["A"].astype(_F32)

    def one(xs):
        cum_b, c_b, alive_b = xs  # [b, blk, d], [b, blk, n], [b, blk]
        h = jnp.exp(cum_b[..., None] * A) * start_BxDxN[:, None]  # [b, blk, d, n]
        return jnp.einsum("btdn,btn->btd", h, c_b) * alive_b[..., None]

    out = jax.lax.map(jax.checkpoint(one), tuple(blocks))  # [blocks, b, blk, d]
    return out.swapaxes(0, 1).reshape(b, -1, d)[:, :length]
