"""Device meshes and logical-axis sharding rules.

A mesh has four named axes, in this order (the last varies fastest over devices, so `tensor`
neighbours share the fastest links):

  data    pure data parallelism: parameters replicated, batch split
  fsdp    batch split and parameters sharded over their `embed` dimension (ZeRO-3 style; XLA
          all-gathers a layer's weights where it needs them)
  expert  batch split, and the experts of every MoE layer split between devices (tokens travel
          to their experts' device by all-to-all, `jamba_jax.expert_parallel`)
  tensor  Megatron tensor parallelism: attention heads, MLP/expert hidden, Mamba's d_inner and the
          vocabulary split; the batch is replicated over it

Parameters carry logical axis names (`nn.with_logical_partitioning`); DEFAULT_RULES map them to
mesh axes. Activations use the logical name "batch" for their leading dimension.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from common.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # activations' leading dimension
    ("embed", ("fsdp", "expert")),  # ZeRO-3 over every batch axis but data (experts: fsdp only)
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("mamba_inner", ("tensor", "fsdp", "expert")),  # x_proj / dt_proj / A_log have no embed axis to shard
    ("exp", "expert"),
    ("layers", None),  # the repeats axis of a scanned layer stack
)  # names not listed ("conv", "norm", None) stay replicated


class MeshError(UserError):
    """The mesh config does not fit the devices, or a batch does not fit the mesh."""


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes in MESH_AXES order, with the one -1 (if any) filling the remaining devices."""
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES) - {"rules"})
    if unknown:
        raise MeshError(f"config.mesh has unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    fill = [a for a, s in sizes.items() if s == -1]
    if bad or len(fill) > 1:
        raise MeshError(f"config.mesh={sizes}: sizes must be positive, with at most one -1 (the rest of the devices)")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n_devices % known:
            raise MeshError(f"config.mesh={sizes}: the fixed axes ({known} devices) do not divide the "
                            f"{n_devices} devices")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise MeshError(f"config.mesh={sizes} spans {math.prod(sizes.values())} devices, but there are {n_devices}")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all devices (of every process) with Auto axes, shaped as `mesh_cfg` says."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware device order on TPU / GPU
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    except (ValueError, NotImplementedError):
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(mesh_cfg: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with `config.mesh.rules` ({logical name: mesh axis, axes or None}) on top."""
    overrides = dict(mesh_cfg.get("rules", None) or {})
    for name, axes in overrides.items():
        for a in spec_axes(axes):
            if a not in MESH_AXES:
                raise MeshError(f"config.mesh.rules[{name!r}] names mesh axis {a!r}; the axes are {list(MESH_AXES)}")
    overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}
    rules = [(k, overrides.pop(k) if k in overrides else v) for k, v in DEFAULT_RULES]
    return tuple(rules + list(overrides.items()))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=DEFAULT_RULES):
    """Traces and runs under `mesh` with `rules`: the model then shards its activations and runs
    its experts expert-parallel (only when the mesh has more than one device)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def spec_axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def current_mesh():
    """The abstract mesh being traced under, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def mesh_axes(logical: Sequence[str | None]) -> tuple[tuple[str, ...], ...]:
    """Mesh axes (a tuple per dimension) of logical axis names under the current rules (the first
    rule naming a logical axis wins). A mesh axis is used once per array: a later dimension keeps
    the rest of its rule (experts [exp, embed, mlp]: `expert` goes to exp, `fsdp` alone to embed)."""
    rules: dict[str, Any] = {}
    for name, axes in nn.get_logical_axis_rules():
        rules.setdefault(name, axes)
    used: set[str] = set()
    out = []
    for name in logical:
        axes = tuple(a for a in spec_axes(rules.get(name)) if a not in used) if name else ()
        used.update(axes)
        out.append(axes)
    return tuple(out)


def axes_size(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def fitted_spec(shape: Sequence[int], logical: Sequence[str | None], mesh) -> P:
    """The PartitionSpec of `logical` under the current rules, leaving replicated any dimension
    the mesh axes do not divide (e.g. a batch of one while generating)."""
    entries = []
    logical = tuple(logical) + (None,) * (len(shape) - len(logical))  # a short spec: the rest replicated
    for dim, axes in zip(shape, mesh_axes(logical), strict=True):
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        entries.append(axes if axes and dim % axes_size(mesh, axes) == 0 else None)
    return P(*entries)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without a multi-device mesh."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fitted_spec(x.shape, logical, mesh)))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Rows over the batch axes, everything else replicated."""
    with nn.logical_axis_rules(rules):
        return NamedSharding(mesh, P(mesh_axes(("batch",))[0] or None))


def batch_shards(mesh: Mesh, rules) -> int:
    with nn.logical_axis_rules(rules):
        return axes_size(mesh, mesh_axes(("batch",))[0])


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding, process_count: int = 1) -> dict:
    """Global arrays from this process's rows of a batch (rows of process p are rows
    [p * n, (p + 1) * n) of the global batch)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * process_count,) + v.shape[1:])
    return out


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) from a matching tree of logical
    PartitionSpecs; a dimension the mesh axes do not divide stays replicated."""
    with nn.logical_axis_rules(rules):
        return jax.tree.map(lambda a, spec: NamedSharding(mesh, fitted_spec(a.shape, tuple(spec), mesh)),
                            abstract_tree, logical_specs)
