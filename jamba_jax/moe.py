"""Jamba's mixture of experts: a float32 router softmax over all experts, top-k without
renormalisation, and dropless SwiGLU experts (transformers' JambaSparseMoeBlock), plus the Switch
load-balancing loss.

The experts themselves are `jamba_jax.grouped_ffn` (the grouped matmul by `config.moe_impl`,
`kernels.grouped_matmul`); under a multi-device mesh they run expert-parallel (`jamba_jax.expert_parallel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.layers import activation, normal_init
from common.sharding import current_mesh
from jamba_jax.config import JambaConfig
from jamba_jax.expert_parallel import expert_parallel_moe
from jamba_jax.grouped_ffn import combine_local
from jamba_jax.layers import dense
from kernels.grouped_matmul import ExpertWeight

_F32 = jnp.float32


class Experts(nn.Module):
    """Stacked SwiGLU experts [num_experts, ...] applied dropless: every (token, choice) pair is
    computed, none is dropped, and no [tokens, num_experts, ...] tensor is built. ExpertsInt8 scales and
    LoRA adapters beside a weight (`<name>_scale`, `<name>_lora_a` / `_lora_b`) are applied where found."""

    cfg: JambaConfig
    impl: str | None = None  # kernels.grouped_matmul.FFN_IMPLS; None: the config's moe_impl

    @nn.compact
    def __call__(self, x_TxE, top_idx_TxK, top_w_TxK):
        """Tokens [T, ...] or [B, L, ...] (rows of a batch: under context parallelism each device keeps its
        slice of every row)."""
        cfg = self.cfg
        n_exp, e, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        dtype = cfg.compute_dtype
        quantized = self.has_variable("params", "gate_proj_scale")  # ExpertsInt8: int8 weights + scales
        init = normal_init(cfg.initializer_range)

        def weight(name, shape, axes):
            w = self.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weights_dtype)
            extra = {}
            if quantized:
                extra["scale"] = self.get_variable("params", f"{name}_scale")
            if self.has_variable("params", f"{name}_lora_a"):
                extra.update(lora_a=self.get_variable("params", f"{name}_lora_a"),
                             lora_b=self.get_variable("params", f"{name}_lora_b"))
            return ExpertWeight(w if quantized else w.astype(dtype), **extra)

        weights = (weight("gate_proj", (n_exp, e, f), ("exp", "embed", "mlp")),  # [X, E, F]
                   weight("up_proj", (n_exp, e, f), ("exp", "embed", "mlp")),
                   weight("down_proj", (n_exp, f, e), ("exp", "mlp", "embed")))  # [X, F, E]
        act, x_TxE, top_w_TxK = activation(cfg.hidden_act), x_TxE.astype(dtype), top_w_TxK.astype(dtype)
        impl = self.impl or cfg.moe_impl
        if current_mesh() is not None:  # tokens sharded over the batch (and length) axes, experts over `expert`
            return expert_parallel_moe(x_TxE, top_idx_TxK, top_w_TxK, weights, act, impl, cfg.moe_capacity_factor)
        y = combine_local(x_TxE.reshape(-1, e), top_idx_TxK.reshape(-1, top_idx_TxK.shape[-1]),
                          top_w_TxK.reshape(-1, top_w_TxK.shape[-1]), weights, act, impl, cfg.moe_capacity_factor)
        return y.reshape(x_TxE.shape)


class SparseMoE(nn.Module):
    """Router softmax over all experts in float32, top-k without renormalisation, then experts.

    Returns (y [batch, length, hidden], router_logits [batch, length, num_experts]).
    """

    cfg: JambaConfig

    @nn.compact
    def __call__(self, x_BxLxE):
        cfg = self.cfg
        router_logits = dense(cfg, cfg.num_experts, ("embed", None), "router")(x_BxLxE)
        probs = jax.nn.softmax(router_logits.astype(_F32), axis=-1)
        top_w, top_idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)
        y = Experts(cfg, name="experts")(x_BxLxE, top_idx, top_w.astype(cfg.compute_dtype))
        return y, router_logits


def load_balancing_loss(router_logits: Sequence[jax.Array], num_experts: int, top_k: int,
                        valid_BxL: jax.Array | None = None) -> jax.Array:
    """Switch Transformer load-balancing loss over all MoE layers (transformers' formula).

    E * sum_e f_e * P_e with f_e the fraction of (token, choice) assignments to expert e and P_e the
    mean router probability of e, both over the real tokens of every MoE layer.
    """
    if not router_logits:
        return jnp.zeros((), _F32)
    counts = jnp.zeros((num_experts,), _F32)
    prob_sum = jnp.zeros((num_experts,), _F32)
    rows = 0.0
    for logits_BxLxX in router_logits:
        probs = jax.nn.softmax(logits_BxLxX.astype(_F32), axis=-1)
        _, top = jax.lax.top_k(probs, top_k)
        w = jnp.ones(probs.shape[:2], _F32) if valid_BxL is None else valid_BxL.astype(_F32)
        counts = counts + jnp.sum(jax.nn.one_hot(top, num_experts, dtype=_F32) * w[..., None, None], axis=(0, 1, 2))
        prob_sum = prob_sum + jnp.sum(probs * w[..., None], axis=(0, 1))
        rows = rows + jnp.sum(w)
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))
