"""LoRA adapters for Jamba (Hu et al. 2021, as peft applies them): beside a targeted weight W [in, out] (or
a stack of them: scanned repeats, experts), A [in, r] and B [r, out], B zero at the start, and the layer
computes x W + (x A)(B alpha / r), so step 0 is exactly the base model. The adapters are the trained
parameters; the base is frozen (a fine-tuning task's frozen inputs), optionally ExpertsInt8.

An adapter sits in the parameter tree beside its weight as `<weight>_lora_a` / `<weight>_lora_b` (Dense's
`kernel_lora_a`, the experts' `gate_proj_lora_a`, Mamba's `dt_proj_kernel_lora_a`); the layers compute it when
they find it (`common.layers.Dense`, `jamba_jax.moe.Experts`, `jamba_jax.mamba.MambaMixer`), so one model
runs the base, the adapted and the merged trees.

Targets by name: attention q_proj, k_proj, v_proj, o_proj; Mamba in_proj, x_proj, dt_proj, out_proj; the dense
MLP's gate_proj, up_proj, down_proj; the experts' experts.gate_proj, experts.up_proj, experts.down_proj.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from common.errors import UserError
from common.tree import flat_items, get_path, set_path
from jamba_jax.config import JambaConfig
from jamba_jax.params import abstract_variables

# target name -> its weight's path inside a decoder layer's parameters
TARGETS = {
    "q_proj": ("self_attn", "q_proj", "kernel"), "k_proj": ("self_attn", "k_proj", "kernel"),
    "v_proj": ("self_attn", "v_proj", "kernel"), "o_proj": ("self_attn", "o_proj", "kernel"),
    "in_proj": ("mamba", "in_proj", "kernel"), "x_proj": ("mamba", "x_proj", "kernel"),
    "dt_proj": ("mamba", "dt_proj_kernel"), "out_proj": ("mamba", "out_proj", "kernel"),
    "gate_proj": ("feed_forward", "gate_proj", "kernel"), "up_proj": ("feed_forward", "up_proj", "kernel"),
    "down_proj": ("feed_forward", "down_proj", "kernel"),
    "experts.gate_proj": ("feed_forward", "experts", "gate_proj"),
    "experts.up_proj": ("feed_forward", "experts", "up_proj"),
    "experts.down_proj": ("feed_forward", "experts", "down_proj"),
}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj")
STACK_AXES = ("layers", "exp")  # leading axes of a stacked weight: scanned repeats, experts


class LoraError(UserError):
    """LoRA settings that cannot be applied to the model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: no adapters (full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the input of A, in training (the Dense adapters; peft has none on expert weights)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    base_quantize: str = ""  # "experts_int8": the frozen base's expert and MLP weights in int8

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora) -> LoraConfig:
        """From a config's `lora` fields (a ConfigDict or dict); names what is wrong."""
        fields = dict(lora)
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LoraError(f"config.lora has no fields {unknown}; it has rank, alpha, dropout, targets, base_quantize")
        if isinstance(fields.get("targets"), str):
            fields["targets"] = tuple(t.strip() for t in fields["targets"].split(",") if t.strip())
        out = cls(**{**fields, "targets": tuple(fields.get("targets", DEFAULT_TARGETS))})
        bad = [t for t in out.targets if t not in TARGETS]
        problems = ([f"rank {out.rank} must be >= 0"] if out.rank < 0 else []) + (
            [f"dropout {out.dropout} must be in [0, 1)"] if not 0 <= out.dropout < 1 else []) + (
            [f"base_quantize {out.base_quantize!r} must be '' or 'experts_int8'"]
            if out.base_quantize not in ("", "experts_int8") else []) + (
            [f"targets {bad} are not targets; the targets are {sorted(TARGETS)}"] if bad else [])
        if problems:
            raise LoraError("config.lora: " + "; ".join(problems))
        return out


def targeted_weights(cfg: JambaConfig, lora: LoraConfig) -> list[tuple[tuple[str, ...], tuple]]:
    """[(weight path, its logical axis names)] of every weight the targets name; LoraError for a target that
    names no weight of this model (a dense-MLP name in an all-MoE model, say)."""
    boxed = jax.tree.leaves_with_path(abstract_variables(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    weights = [(tuple(str(getattr(k, "key", k)) for k in path), leaf.names) for path, leaf in boxed]
    out = []
    for target in lora.targets:
        suffix = TARGETS[target]
        found = [(p, names) for p, names in weights if p[-len(suffix):] == suffix]
        if not found:
            raise LoraError(f"config.lora.targets: {target!r} names no weight of this model (the model's layers: "
                            f"{cfg.num_hidden_layers}, experts {cfg.num_experts}); targets it has: "
                            f"{sorted(t for t, s in TARGETS.items() if any(p[-len(s):] == s for p, _ in weights))}")
        out += found
    return out


def _adapter_shapes(shape, names, rank):
    """(A's shape and logical axes, B's) for a weight [*stack, in, *out] with these axis names."""
    lead = sum(1 for n in names if n in STACK_AXES)
    stack, (n_in, *n_out) = names[:lead], names[lead:]
    a = (tuple(shape[:lead]) + (shape[lead], rank), stack + (n_in, None))
    b = (tuple(shape[:lead]) + (rank,) + tuple(shape[lead + 1:]), stack + (None, *n_out))
    return a, b


def init_adapters(cfg: JambaConfig, lora: LoraConfig, rng) -> dict[str, Any]:
    """The adapters: A uniform in +-1/sqrt(in) (peft's kaiming init), B zero, float32."""
    shapes = jax.eval_shape(lambda: nn.unbox(abstract_variables(cfg)))
    out: dict[str, Any] = {}
    for i, (path, names) in enumerate(targeted_weights(cfg, lora)):
        shape = get_path(shapes, path).shape
        (a_shape, _), (b_shape, _) = _adapter_shapes(shape, names, lora.rank)
        bound = 1.0 / a_shape[-2] ** 0.5
        set_path(out, path[:-1] + (f"{path[-1]}_lora_a",),
                 jax.random.uniform(jax.random.fold_in(rng, i), a_shape, jnp.float32, -bound, bound))
        set_path(out, path[:-1] + (f"{path[-1]}_lora_b",), jnp.zeros(b_shape, jnp.float32))
    return out


def adapter_specs(cfg: JambaConfig, lora: LoraConfig) -> dict[str, Any]:
    """Logical PartitionSpecs of the adapters: A like its weight's stack and input axes, B like its stack and
    output axes (an expert's adapters shard with the expert)."""
    shapes = jax.eval_shape(lambda: nn.unbox(abstract_variables(cfg)))
    out: dict[str, Any] = {}
    for path, names in targeted_weights(cfg, lora):
        (_, a_names), (_, b_names) = _adapter_shapes(get_path(shapes, path).shape, names, lora.rank)
        set_path(out, path[:-1] + (f"{path[-1]}_lora_a",), PartitionSpec(*a_names))
        set_path(out, path[:-1] + (f"{path[-1]}_lora_b",), PartitionSpec(*b_names))
    return out


def with_adapters(base: dict, adapters: dict, scale: float) -> dict:
    """The base tree with the adapters beside their weights, B scaled by alpha / r: what the model applies."""
    out = jax.tree.map(lambda x: x, base)  # a new tree (the base's arrays, not copies)
    for path, leaf in flat_items(adapters):
        set_path(out, path, leaf * scale if path[-1].endswith("_lora_b") else leaf)
    return out


def merged_weights(cfg: JambaConfig, base: dict, adapters: dict, scale: float) -> dict:
    """The base tree with each adapted weight replaced by W + A (B alpha / r), in the weight's dtype (an
    ExpertsInt8 weight is dequantised first, its scale dropped): what transformers or vLLM load as a model."""
    from jamba_jax.quantization import dequantize_int8

    out = jax.tree.map(lambda x: x, base)
    for path, leaf in flat_items(adapters):
        if not path[-1].endswith("_lora_a"):
            continue
        name = path[-1][:-len("_lora_a")]
        parent = get_path(out, path[:-1])
        b = get_path(adapters, path[:-1] + (f"{name}_lora_b",))
        w = parent[name]
        if f"{name}_scale" in parent:
            w = dequantize_int8(w, parent.pop(f"{name}_scale")).astype(jnp.float32)
            dtype = jnp.dtype(cfg.weights_dtype)
        else:
            dtype = w.dtype
        lead = leaf.ndim - 2  # stacked axes (scanned repeats, experts); B's output axes flattened for the product
        delta = jnp.einsum("...ir,...ro->...io", leaf, b.reshape(b.shape[:lead + 1] + (-1,)))
        parent[name] = (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(dtype)
    return out
