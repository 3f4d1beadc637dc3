"""Where each decoder layer's parameters (and generation cache) live, in the two layouts:

  unrolled     model/layers_{i}/...               one subtree per layer (transformers' module tree)
  scanned      model/cycles/layers_{j}/...        j = i % cycle, with a leading [repeats] axis
               (`JambaConfig.scan_layers`)        (r = i // cycle): the stack is one `nn.scan` over
                                                  the repeats of the layer cycle, so the program
                                                  holds each kind of layer once (MaxText's
                                                  inhomogeneous layer cycle).

Jamba's cycle is 8 layers (attention every 8, MoE every 2): Mini scans 4 repeats, Large 9.
HF conversion, ExpertsInt8 and the cache all address layers through these functions.
"""

from __future__ import annotations

from jamba_jax.config import JambaConfig

CYCLES = "cycles"  # the scanned stack's module name


def layer_location(cfg: JambaConfig, i: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(parameter path of layer i's subtree, indices into that subtree's leading stacked axes)."""
    if cfg.scan_layers:
        return ("model", CYCLES, f"layers_{i % cfg.layer_cycle}"), (i // cfg.layer_cycle,)
    return ("model", f"layers_{i}"), ()


def layer_stacks(cfg: JambaConfig) -> list[tuple[tuple[str, ...], int]]:
    """Each distinct layer subtree once: (its path, the index of a layer it holds). Unrolled: every
    layer; scanned: the cycle's positions, each stacked over the repeats."""
    n = cfg.layer_cycle if cfg.scan_layers else cfg.num_hidden_layers
    return [(layer_location(cfg, i)[0], i) for i in range(n)]


def repeats(cfg: JambaConfig) -> int:
    return cfg.num_hidden_layers // cfg.layer_cycle if cfg.scan_layers else 1


def to_scanned(cfg: JambaConfig, params: dict) -> dict:
    """Unrolled parameters (model/layers_{i}) restacked for `cfg.replace(scan_layers=True)`."""
    import jax
    import jax.numpy as jnp

    model = dict(params["model"])
    cycle, n = cfg.layer_cycle, cfg.num_hidden_layers
    layers = [model.pop(f"layers_{i}") for i in range(n)]
    model[CYCLES] = {f"layers_{j}": jax.tree.map(lambda *xs: jnp.stack(xs), *layers[j::cycle]) for j in range(cycle)}
    return {**params, "model": model}


def to_unrolled(cfg: JambaConfig, params: dict) -> dict:
    """Scanned parameters (model/cycles/layers_{j} stacked) as one subtree per layer."""
    import jax

    model = dict(params["model"])
    stacks = model.pop(CYCLES)
    cycle = cfg.layer_cycle
    for i in range(cfg.num_hidden_layers):
        model[f"layers_{i}"] = jax.tree.map(lambda x, r=i // cycle: x[r], stacks[f"layers_{i % cycle}"])
    return {**params, "model": model}


def layer_output(cfg: JambaConfig, hidden_states: dict, i: int):
    """Layer i's output [batch, length, hidden] from the "hidden_states" collection of an apply with
    mutable=["hidden_states"] (each DecoderLayer sows its output there)."""
    path, index = layer_location(cfg, i)
    node = hidden_states
    for key in path:
        node = node[key]
    return node["output"][0][index] if index else node["output"][0]
