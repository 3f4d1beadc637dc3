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

from common.losses import LOSS_CHUNK_BYTES
from common.tree import flat_items, get_path, key_path
from jamba_jax.config import JambaConfig
from jamba_jax.model import JambaForCausalLM


@functools.lru_cache(maxsize=16)
def _boxed_init(cfg: JambaConfig):
    """The model's initialiser as one jitted function of the rng, boxed (logically partitioned) params
    out, one per config: a fresh `jax.jit(model.init)` is a new function to jit's caches and compiles
    again. Its trace is cached too, so the abstract tree, the pre-flight's abstract state and the real
    initialiser trace the model once between them."""
    model = JambaForCausalLM(cfg)
    return jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


@functools.lru_cache(maxsize=32)
def abstract_variables(cfg: JambaConfig) -> dict[str, Any]:
    """The boxed (logically partitioned) parameter tree as ShapeDtypeStructs."""
    return jax.eval_shape(_boxed_init(cfg), jax.random.PRNGKey(0))


def abstract_params(cfg: JambaConfig) -> dict[str, Any]:
    """Plain (unboxed) parameter tree of ShapeDtypeStructs (no sharding constraint: callable under a mesh)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, abstract_variables(cfg),
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


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
    return nn.unbox(_boxed_init(cfg)(rng))


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


def _layer_bytes(cfg: JambaConfig, tokens: int) -> int:
    """One decoder layer's working set for `tokens` tokens: the larger mixer, the feed-forward
    (per routed choice, with the dispatched copies of its input and output), the norms and the
    residual stream. Calibrated against XLA's buffer assignment on CPU (tiny Jamba, float32: 17.4K
    bytes/token estimated vs 17.3K measured without experts, 26.6K vs 26.5K with 4 experts, top-2)."""
    item = jnp.dtype(cfg.compute_dtype).itemsize
    e, i, f, k = cfg.hidden_size, cfg.mamba_d_inner, cfg.intermediate_size, cfg.num_experts_per_tok
    kv = cfg.num_key_value_heads * cfg.head_dim
    mamba = tokens * i * (6 * item + 6 * 4)  # in_proj halves, conv, y, gate in the compute dtype; dt, scan in f32
    attention = tokens * (2 * e + 2 * kv) * item  # q, k, v, output (scores: one block at a time)
    if cfg.num_experts > 1:
        ffn = tokens * max(k, 1) * (3 * f + 6 * e) * item  # gate, up, activation; dispatched in/out per choice
    else:
        ffn = tokens * 3 * f * item
    return max(mamba, attention) + ffn + tokens * 4 * e * item


def _saved_bytes(cfg: JambaConfig, tokens: int) -> int:
    """What one layer keeps for the backward pass under `cfg.remat_policy` (`jamba_jax.remat`)."""
    item = jnp.dtype(cfg.compute_dtype).itemsize
    e, i, f, k = cfg.hidden_size, cfg.mamba_d_inner, cfg.intermediate_size, max(cfg.num_experts_per_tok, 1)
    inputs = tokens * e * item
    if cfg.remat_policy == "none":
        return _layer_bytes(cfg, tokens)
    if cfg.remat_policy == "save_attention_and_moe_outputs":  # the mixer's or the MoE's output, per layer
        return inputs + tokens * e * item
    if cfg.remat_policy == "save_dots":  # the projections: Mamba's in/x/dt/out or attention's q/k/v/o, the FFN's
        kv = cfg.num_key_value_heads * cfg.head_dim
        mixer = max(tokens * (3 * i + cfg.mamba_dt_rank + 2 * cfg.mamba_d_state + e),
                    tokens * (2 * e + 2 * kv))
        ffn = tokens * k * (2 * f + e) if cfg.num_experts > 1 else tokens * (2 * f + e)
        return inputs + (mixer + ffn) * item
    return inputs  # "full": the layer's input alone


def activation_bytes(cfg: JambaConfig, batch: int, length: int, context_shards: int = 1) -> int:
    """A rough upper estimate of a training step's activation memory per device (batch rows of
    `length` tokens, each row split over `context_shards` devices): what the layers keep for the backward
    pass (`cfg.remat_policy`: everything, some tagged outputs or only each layer's input), one layer's full
    working set (the layer being differentiated; under context parallelism an attention layer also gathers
    its whole rows' keys and values, and their gradients), and one chunk of the loss's float32 logits with
    their log-softmax and gradient (`common.losses.chunked_token_nll`: at most LOSS_CHUNK_BYTES of logits, or
    one position of every row). Used by the memory pre-flight; the dry run prints it."""
    tokens = batch * (length // context_shards)
    saved = cfg.num_hidden_layers * _saved_bytes(cfg, tokens)
    logits = max(min(tokens * cfg.vocab_size * 4, LOSS_CHUNK_BYTES), batch * cfg.vocab_size * 4) * 3
    gathered = 0
    if context_shards > 1 and any(cfg.is_attention_layer(i) for i in range(cfg.num_hidden_layers)):
        gathered = 4 * batch * length * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    return int(saved + _layer_bytes(cfg, tokens) + gathered + logits)


def forward_bytes_per_token(cfg: JambaConfig) -> int:
    """A forward pass's activation memory per token when only the last position's logits are kept
    (prefill): one layer's working set (XLA frees each layer's temporaries before the next)."""
    return int(_layer_bytes(cfg, 1))
