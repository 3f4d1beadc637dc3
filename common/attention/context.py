"""Attention with the token dimension split over devices (context parallelism), exactly: each device keeps
its own slice of the queries and gathers every slice's keys and values (one all-gather over the length
axes; cheap with a few KV heads: Jamba's 8 of 128 channels), then runs the single-device attention with its
queries' true positions, so causal block skipping still ends each query block at its last position and the
mask still comes from positions, padding and segment ids (no [L, L] array). The backward pass's all-gather
transposes to a reduce-scatter of the keys' and values' gradients.

Slices are contiguous, so the device holding the last slice does the most causal work (no zig-zag
reordering: the loss, positions and the Mamba carry then all see the natural order)."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from common.attention.mask import AttentionMask
from common.sharding import current_mesh, fitted_spec, spec_axes


def context_split(q_BxLxHxGxD, k_BxHxSxD, mask: AttentionMask):
    """(q's PartitionSpec, the mesh axes splitting its tokens) when self-attention over whole rows runs under
    a mesh whose rules split the token dimension (and the mesh divides it); else None."""
    mesh = current_mesh()
    if mesh is None or k_BxHxSxD.shape[2] != q_BxLxHxGxD.shape[1]:
        return None
    q_spec = fitted_spec(q_BxLxHxGxD.shape, ("batch", "length", "kv_heads", None, None), mesh)
    return (q_spec, spec_axes(q_spec[1])) if q_spec[1] is not None else None


def context_parallel_attention(attend: Callable, q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask,
                               q_spec: P, axes: tuple[str, ...]):
    """attend(q, k, v, mask) per device over its query slice and the gathered keys (module docstring)."""
    b, slices, heads = q_spec[0], q_spec[1], q_spec[2]
    kv_spec = P(b, heads, slices, None)
    mask_spec = AttentionMask(P(b, None), None if mask.q_pos is None else P(slices),
                              None if mask.q_segment is None else P(b, slices),
                              None if mask.k_segment is None else P(b, None))

    def body(q, k, v, m):
        k = jax.lax.all_gather(k, axes, axis=2, tiled=True)  # [B, H, S, D]: every slice's keys, in order
        v = jax.lax.all_gather(v, axes, axis=2, tiled=True)
        return attend(q, k, v, m)

    return jax.shard_map(body, mesh=current_mesh(), in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
                         out_specs=q_spec, check_vma=False)(q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask)
