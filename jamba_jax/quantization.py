"""ExpertsInt8 (Jamba-1.5, section 3; as served in vLLM): MoE expert weights (and, by default, the
dense MLP weights) stored as int8, symmetric, one float32 scale per output channel per expert:

    scale = max |W| over the input dimension / 127,   q = clip(round(W / scale), -127, 127)

Router, attention, Mamba, norms and embeddings stay as they are. The quantised tree has the same
layout with an extra `<name>_scale` ([num_experts, out] for experts, [out] for a dense kernel), and
the same `JambaForCausalLM(cfg).apply` accepts it: the layers see the scales and dequantise inside
the matmul (`kernels.int8_matmul`), so activations stay in the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.errors import UserError
from common.tree import copy_path, get_path
from jamba_jax.config import JambaConfig
from jamba_jax.layout import layer_stacks

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class QuantizationError(UserError):
    """Parameters that cannot be (de)quantised as asked."""


def quantize_int8(w, xp=jnp):
    """Per-output-channel symmetric int8 of w [..., in, out]: (q int8 [..., in, out], scale f32 [..., out])."""
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=-2)
    # x (1/127) rather than / 127: XLA rewrites a division by a constant as this product, so numpy (a
    # checkpoint quantised as it streams in) and jax give the same scales bit for bit
    scale = xp.where(amax > 0, amax * np.float32(1.0 / 127.0), 1.0).astype(xp.float32)
    q = xp.clip(xp.round(w32 / scale[..., None, :]), -127, 127).astype(xp.int8)
    return q, scale


def dequantize_int8(q, scale):
    return q.astype(jnp.float32) * scale[..., None, :]


def quantized_weights(cfg: JambaConfig, include_mlp: bool):
    """(path to the weight's parent dict, weight name, scale name) for every tensor to quantise."""
    out = []
    for path, i in layer_stacks(cfg):  # scanned: each stack once, its weights [repeats, ...]
        ff = path + ("feed_forward",)
        if cfg.is_moe_layer(i):
            out += [(ff + ("experts",), name, f"{name}_scale") for name in EXPERT_WEIGHTS]
        elif include_mlp:
            out += [(ff + (name,), "kernel", "kernel_scale") for name in EXPERT_WEIGHTS]
    return out


def quantize_experts_int8(cfg: JambaConfig, params: dict[str, Any], include_mlp: bool = True) -> dict[str, Any]:
    """Returns a new tree with the expert (and dense-MLP) weights as int8 plus per-channel scales."""
    if not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise QuantizationError("the config has no mixture-of-experts layer (num_experts <= 1): nothing for "
                                "ExpertsInt8 to quantise")
    params = dict(nn.unbox(params))
    for path, name, scale_name in quantized_weights(cfg, include_mlp):
        node = copy_path(params, path)
        if scale_name in node or node[name].dtype == jnp.int8:
            raise QuantizationError(f"{'/'.join(path + (name,))} is already int8: the parameters are quantised")
        node[name], node[scale_name] = quantize_int8(node[name])
    return params


def is_quantized(params) -> bool:
    return any(getattr(x, "dtype", None) == jnp.int8 for x in jax.tree.leaves(params))


def check_quantized(cfg: JambaConfig, params, include_mlp: bool = True) -> None:
    """Raises QuantizationError naming the first weight whose scale is missing or does not fit it."""
    for path, name, scale_name in quantized_weights(cfg, include_mlp):
        node = get_path(params, path)
        w, s = node.get(name), node.get(scale_name)
        where = "/".join(path + (name,))
        if w is None or s is None or w.dtype != jnp.int8:
            raise QuantizationError(f"{where}: expected an int8 weight with its {scale_name}")
        if tuple(s.shape) != tuple(w.shape[:-2]) + (w.shape[-1],):
            raise QuantizationError(f"{where}: scale shape {tuple(s.shape)} does not match the weight "
                                    f"{tuple(w.shape)} (one scale per output channel)")


def weight_bytes(cfg: JambaConfig, dtype="bfloat16", include_mlp: bool = True) -> dict[str, int]:
    """Weight bytes from the config alone: {"baseline", "int8", "experts_baseline", "experts_int8"}."""
    from jamba_jax.params import abstract_params

    item = np.dtype(jnp.dtype(dtype)).itemsize
    shapes = abstract_params(cfg)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) * item
    quant_base = quant_int8 = exp_base = exp_int8 = 0
    for path, name, _ in quantized_weights(cfg, include_mlp):
        shape = get_path(shapes, path)[name].shape
        n, scales = int(np.prod(shape)), int(np.prod(shape[:-2])) * shape[-1]
        quant_base += n * item
        quant_int8 += n + 4 * scales
        if path[-1] == "experts":
            exp_base, exp_int8 = exp_base + n * item, exp_int8 + n + 4 * scales
    return {"baseline": total, "int8": total - quant_base + quant_int8, "experts_baseline": exp_base,
            "experts_int8": exp_int8}
