"""The MoE experts under a device mesh, as one `jax.shard_map` (GShard's expert parallelism).

Inside, every device holds its own tokens (split over the batch axes) and num_experts / n of the
experts (split over the `expert` axis, n devices), whole along `embed` (fsdp-sharded weights are
all-gathered as they enter: ZeRO-3) and split along the expert hidden size over `tensor` (each
device computes a partial FFN; one psum sums them: Megatron's MLP split).

Expert parallel, when the `expert` axis is one of the axes the tokens are split over:
  1. sort this device's (token, choice) pairs by expert, so those bound for each expert shard
     are contiguous, and copy them into a send buffer [n, C, hidden] (slot c of row d: the c-th
     pair bound for device d), with the local expert id of each slot (or "none");
  2. all-to-all: device d receives the [n, C] slots every device sent it;
  3. grouped FFN of its local experts over the received rows (empty slots cost nothing);
  4. all-to-all back, and each pair's result is weighted by its router probability and added
     into its token.
C, the slots per (source, destination) pair, is static. Dropless (capacity_factor 0, the default)
takes C = the pairs a device holds, the most it can send one destination, so nothing is ever
dropped and each device sends n x its pairs. A capacity factor f > 0 takes C = ceil(f x pairs /
n) and drops the pairs past it (their contribution is 0, the residual carries the token).

When the tokens are not split over `expert` (a batch the mesh does not divide, e.g. one sequence
while generating), each device instead runs the choices of its local experts on all its tokens
and one psum over `expert` sums the experts' contributions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from common.sharding import axes_size, current_mesh, fitted_spec, spec_axes
from jamba_jax.grouped_ffn import combine_local, permute, unpermute
from kernels.grouped_matmul import ExpertWeight


def _weight_specs(ew: ExpertWeight, spec: P) -> ExpertWeight:
    """The shard_map specs of an ExpertWeight whose w is split as `spec` = (experts, in, out): the scale like the
    output, LoRA's A like the input (rank whole), B like the output."""
    ex, d_in, d_out = spec
    return ExpertWeight(spec, None if ew.scale is None else P(ex, d_out),
                        None if ew.lora_a is None else P(ex, d_in, None),
                        None if ew.lora_b is None else P(ex, None, d_out))


def expert_parallel_moe(x_TxE, top_idx_TxK, top_w_TxK, weights, act, impl="auto", capacity_factor: float = 0.0):
    """sum_k top_w[t, k] * FFN_{top_idx[t, k]}(x[t]) with the experts sharded as the rules say.

    The tokens: [T, ...] split over the batch axes, or [B, L, ...] split over the batch and (context
    parallelism) the length axes; each device takes its own tokens as they lie. weights: the (gate, up, down)
    `kernels.grouped_matmul.ExpertWeight`s (w [X, E, F], [X, E, F], [X, F, E]; ExpertsInt8 scales and LoRA
    adapters sharded with their experts).
    """
    mesh = current_mesh()
    lead = top_idx_TxK.shape[:-1]
    tok_spec = fitted_spec(lead, ("batch", "length")[:len(lead)], mesh)
    gate_spec = fitted_spec(weights[0].w.shape, ("exp", "embed", "mlp"), mesh)
    down_spec = fitted_spec(weights[2].w.shape, ("exp", "mlp", "embed"), mesh)
    # fsdp: the weights enter with `embed` whole (XLA all-gathers them at the boundary, and
    # reduce-scatters their gradients back): ZeRO-3
    gate_spec, down_spec = P(gate_spec[0], None, gate_spec[2]), P(down_spec[0], down_spec[1], None)
    tok_axes = tuple(a for entry in tok_spec for a in spec_axes(entry))
    ep_axes, mlp_axes = spec_axes(gate_spec[0]), spec_axes(gate_spec[2])
    n_ep = axes_size(mesh, ep_axes)
    all_to_all = bool(ep_axes) and set(ep_axes) <= set(tok_axes)

    def body(x, idx, w, local):
        shape = x.shape
        x, idx, w = x.reshape(-1, shape[-1]), idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1])
        e_loc = local[0].w.shape[0]
        if all_to_all:
            out = _all_to_all_experts(x, idx, w, local, act, impl, ep_axes, n_ep, e_loc, capacity_factor)
        else:
            if ep_axes:  # choices of another device's experts -> "no expert" here
                first = jax.lax.axis_index(ep_axes) * e_loc
                idx = jnp.where((idx >= first) & (idx < first + e_loc), idx - first, e_loc)
            out = combine_local(x, idx, w, local, act, impl, capacity_factor)
            if ep_axes:
                out = jax.lax.psum(out, ep_axes)
        out = jax.lax.psum(out, mlp_axes) if mlp_axes else out
        return out.reshape(shape)

    specs = tuple(_weight_specs(ew, sp) for ew, sp in zip(weights, (gate_spec, gate_spec, down_spec), strict=True))
    tokens = P(*tok_spec, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(tokens,) * 3 + (specs,),
                         out_specs=tokens)(x_TxE, top_idx_TxK, top_w_TxK, tuple(weights))


def capacity(pairs: int, n_ep: int, capacity_factor: float) -> int:
    """Static slots per (source, destination) device pair."""
    if capacity_factor <= 0:
        return pairs
    return max(1, min(pairs, math.ceil(capacity_factor * pairs / n_ep)))


def _all_to_all_experts(x_TxE, idx_TxK, w_TxK, weights, act, impl, ep_axes, n_ep, e_loc, capacity_factor):
    t, e = x_TxE.shape
    m = idx_TxK.size
    slots = capacity(m, n_ep, capacity_factor)
    perm = permute(idx_TxK)  # M below: the (token, choice) pairs in sorted order
    dest_M = perm.expert_M // e_loc
    per_dest = jnp.bincount(dest_M, length=n_ep)
    slot_M = jnp.arange(m) - (jnp.cumsum(per_dest) - per_dest)[dest_M]  # rank among pairs to the same device

    send_x = jnp.zeros((n_ep, slots, e), x_TxE.dtype).at[dest_M, slot_M].set(x_TxE[perm.token_M], mode="drop")
    send_e = jnp.full((n_ep, slots), e_loc, jnp.int32).at[dest_M, slot_M].set(perm.expert_M % e_loc, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, ep_axes, 0, 0, tiled=True)  # [source, slot, E]
    recv_e = jax.lax.all_to_all(send_e, ep_axes, 0, 0, tiled=True)
    ones = jnp.ones((n_ep * slots, 1), x_TxE.dtype)
    y = combine_local(recv_x.reshape(-1, e), recv_e.reshape(-1, 1), ones, weights, act, impl)
    back = jax.lax.all_to_all(y.reshape(n_ep, slots, e), ep_axes, 0, 0, tiled=True)  # [destination, slot, E]
    y_M = back.at[dest_M, slot_M].get(mode="fill", fill_value=0)  # a dropped pair contributes 0
    return unpermute(y_M, perm, w_TxK, t)
