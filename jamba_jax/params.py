"""Parameter shapes and counts from the config alone (`jax.eval_shape`: nothing is allocated).

`count_params(cfg)` splits the parameters by kind, and counts the active ones per token: of a
mixture of experts only `num_experts_per_tok` of `num_experts` experts run for a token.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from common.tree import flat_items, get_path, key_path
from jamba_jax.config import JambaConfig
from jamba_jax.model import JambaForCausalLM


@functools.lru_cache(maxsize=32)
def abstract_variables(cfg: JambaConfig) -> dict[str, Any]:
    """The boxed (logically partitioned) parameter tree as ShapeDtypeStructs."""
    model = JambaForCausalLM(cfg)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]


def abstract_params(cfg: JambaConfig) -> dict[str, Any]:
    """Plain (unboxed) parameter tree of ShapeDtypeStructs."""
    return nn.unbox(abstract_variables(cfg))


def param_logical_specs(cfg: JambaConfig, params=None) -> dict[str, Any]:
    """Logical PartitionSpecs of the parameters; with `params` given, of that tree, which may be
    ExpertsInt8-quantised: a `<name>_scale` [..., out] shards as its weight [..., in, out] minus `in`."""
    specs = nn.get_partition_spec(abstract_variables(cfg))
    if params is None:
        return specs

    def spec_of(path, _):
        keys = key_path(path)
        node, name = get_path(specs, keys[:-1]), keys[-1]
        if name.endswith("_scale"):
            weight = tuple(node[name[:-len("_scale")]])
            return PartitionSpec(*(weight[:-2] + weight[-1:]))
        return node[name]

    return jax.tree_util.tree_map_with_path(spec_of, params)


def init_params(cfg: JambaConfig, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialised, unboxed parameters (on the default device)."""
    model = JambaForCausalLM(cfg)
    return nn.unbox(jax.jit(model.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def _kind(path: tuple[str, ...]) -> str:
    keys = "/".join(path)
    if "embed_tokens" in keys:
        return "embedding"
    if path[0] == "lm_head":
        return "lm_head"
    if "/experts/" in keys:
        return "experts"
    if "/router/" in keys:
        return "router"
    if "/self_attn/" in keys:
        return "attention"
    if "/mamba/" in keys:
        return "mamba"
    if "/feed_forward/" in keys:
        return "mlp"
    return "norms"


def count_params(cfg: JambaConfig) -> dict[str, Any]:
    """{'by_kind': {kind: count}, 'total': int, 'active': int, 'bytes': int} from shapes alone."""
    by_kind: dict[str, int] = {}
    nbytes = 0
    for keys, leaf in flat_items(abstract_params(cfg)):
        n = int(np.prod(leaf.shape))
        by_kind[_kind(keys)] = by_kind.get(_kind(keys), 0) + n
        nbytes += n * jnp.dtype(leaf.dtype).itemsize
    total = sum(by_kind.values())
    experts = by_kind.get("experts", 0)
    active = total - experts + experts * cfg.num_experts_per_tok // max(cfg.num_experts, 1)
    return {"by_kind": by_kind, "total": total, "active": active, "bytes": nbytes}


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_param_table(cfg: JambaConfig) -> str:
    """A readable table of parameter counts by kind, with the total and the active count."""
    c = count_params(cfg)
    n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.num_hidden_layers))
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    lines = [f"Jamba: {cfg.num_hidden_layers} layers ({n_attn} attention, {cfg.num_hidden_layers - n_attn} Mamba; "
             f"{n_moe} MoE with {cfg.num_experts} experts top-{cfg.num_experts_per_tok})",
             f"{'kind':<12}{'parameters':>18}"]
    for kind in ("embedding", "attention", "mamba", "mlp", "router", "experts", "norms", "lm_head"):
        if kind in c["by_kind"]:
            lines.append(f"{kind:<12}{c['by_kind'][kind]:>18,}")
    lines.append(f"{'total':<12}{c['total']:>18,}  ({_human(c['total'])})")
    lines.append(f"{'active/token':<12}{c['active']:>18,}  ({_human(c['active'])})")
    return "\n".join(lines)


def activation_bytes(cfg: JambaConfig, batch: int, length: int) -> int:
    """A rough upper estimate of a training step's activation memory per device (batch rows of
    `length` tokens there): what the layers keep for the backward pass (with `remat`, only each
    layer's input), one layer's full working set (the layer being differentiated), and the float32
    logits with their log-softmax and gradient. Used by the memory pre-flight; the dry run prints it."""
    item = jnp.dtype(cfg.compute_dtype).itemsize
    tokens = batch * length
    e, i, f, k = cfg.hidden_size, cfg.mamba_d_inner, cfg.intermediate_size, cfg.num_experts_per_tok
    kv = cfg.num_key_value_heads * cfg.head_dim
    mamba = tokens * 4 * i * item + tokens * 2 * i * 4  # x, z, conv, y; dt and the scan's float32 residuals
    attention = tokens * (2 * e + 2 * kv) * item  # q, k, v, output (scores are blockwise past 2K keys)
    ffn = tokens * 3 * f * item * max(k if cfg.num_experts > 1 else 1, 1)  # gate, up, activation per choice
    layer = max(mamba, attention) + ffn + tokens * 4 * e * item  # norms and residual stream
    saved = cfg.num_hidden_layers * (tokens * e * item if cfg.remat else layer)
    logits = tokens * cfg.vocab_size * 4 * 3
    return int(saved + layer + logits)
