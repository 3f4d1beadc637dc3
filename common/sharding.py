"""Device meshes and logical-axis sharding rules.

A mesh has four named axes, in this order (the last varies fastest over devices, so `tensor`
neighbours share the fastest links):

  data    pure data parallelism: parameters replicated, batch split
  fsdp    batch split and parameters sharded over their `embed` dimension (ZeRO-3 style; XLA
          all-gathers a layer's weights where it needs them)
  context the sequence split: every row's tokens in contiguous slices, one per device along the axis
          (`jamba_jax.sequence_ops`: the Mamba conv takes a halo from the previous slice and the scan
          carries its state across slices; `common.attention.context`: attention gathers the keys and
          values); parameters ZeRO-sharded over it like fsdp, since each slice computes every
          parameter's gradient from its tokens (a reduction over the axis either way) and replicating
          them would multiply the parameters' and optimizer state's memory by the axis size
  expert  batch split, and the experts of every MoE layer split between devices (tokens travel
          to their experts' device by all-to-all, `jamba_jax.expert_parallel`)
  tensor  Megatron tensor parallelism: attention heads, MLP/expert hidden, Mamba's d_inner and the
          vocabulary split; the batch is replicated over it

Parameters carry logical axis names (`nn.with_logical_partitioning`); DEFAULT_RULES map them to
mesh axes. Activations use the logical name "batch" for their leading dimension and "length" for
their token dimension.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from common.errors import UserError

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # activations' leading dimension
    ("length", "context"),  # activations' token dimension
    ("embed", ("fsdp", "expert", "context")),  # ZeRO-3 over every batch axis but data, and context (experts:
    # fsdp and context)
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("mamba_inner", ("tensor", "fsdp", "expert", "context")),  # x_proj / dt_proj / A_log have no embed axis to shard
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


class BatchSharding(NamedTuple):
    """Where a batch's arrays go: rows over the batch axes, and (context parallelism) the token
    dimension of [rows, length, ...] arrays over the length axes, each device a contiguous slice."""

    mesh: Mesh
    rows: tuple[str, ...]
    length: tuple[str, ...]

    def of(self, shape: Sequence[int]) -> NamedSharding:
        """The sharding of one array (the token split only where it divides the second dimension)."""
        split = len(shape) > 1 and self.length and shape[1] % axes_size(self.mesh, self.length) == 0
        return NamedSharding(self.mesh, P(self.rows or None, self.length) if split else P(self.rows or None))


def batch_sharding(mesh: Mesh, rules) -> BatchSharding:
    """Rows over the batch axes, tokens over the length axes, everything else replicated."""
    with nn.logical_axis_rules(rules):
        rows, length = mesh_axes(("batch", "length"))
    return BatchSharding(mesh, tuple(a for a in rows if mesh.shape[a] > 1),
                         tuple(a for a in length if mesh.shape[a] > 1))


def batch_shards(mesh: Mesh, rules) -> int:
    with nn.logical_axis_rules(rules):
        return axes_size(mesh, mesh_axes(("batch",))[0])


def length_shards(mesh: Mesh, rules) -> int:
    """How many slices the token dimension is cut into (context parallelism; 1 without it)."""
    with nn.logical_axis_rules(rules):
        return axes_size(mesh, mesh_axes(("batch", "length"))[1])


def row_blocks(sharding: BatchSharding, rows: int, process_index: int) -> tuple[int, int]:
    """(the block of a `rows`-row batch that process `process_index` loads, how many blocks there are). The
    processes whose devices hold the same rows (a context group or a tensor group spanning hosts) load the
    same block; each block is a contiguous range of rows."""
    index_map = sharding.of((rows,)).devices_indices_map((rows,))
    spans: dict[int, set] = {}
    for device, (sl,) in index_map.items():
        spans.setdefault(device.process_index, set()).add((sl.start or 0, rows if sl.stop is None else sl.stop))
    blocks = {p: (min(a for a, _ in s), max(b for _, b in s)) for p, s in spans.items()}
    ordered = sorted(set(blocks.values()))
    sizes = {b - a for a, b in ordered}
    if len(sizes) != 1 or sum(b - a for a, b in ordered) != rows:
        raise MeshError(f"config.mesh ({dict(sharding.mesh.shape)}) does not give each process a contiguous block "
                        f"of the batch's rows (process blocks {sorted(blocks.items())}); order the axes so each "
                        "host's devices share rows")
    return ordered.index(blocks[process_index]), len(ordered)


def put_batch(batch: Mapping[str, np.ndarray], sharding: BatchSharding, blocks: int = 1) -> dict:
    """Global arrays from this process's rows of a batch: its block of `blocks` (`row_blocks`), whole rows; each
    device takes its part (a slice of the tokens under context parallelism)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        shape = (v.shape[0] * blocks,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding.of(shape), v, shape)
    return out


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) from a matching tree of logical
    PartitionSpecs; a dimension the mesh axes do not divide stays replicated."""
    with nn.logical_axis_rules(rules):
        return jax.tree.map(lambda a, spec: NamedSharding(mesh, fitted_spec(a.shape, tuple(spec), mesh)),
                            abstract_tree, logical_specs)
