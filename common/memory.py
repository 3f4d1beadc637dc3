"""How much memory a device has, and how much of a tree of arrays it holds: what the pre-flights of training
(`training.memory`) and serving (`serving.config`) size their plans with before allocating anything."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

GIB = 2**30


def device_memory_bytes() -> tuple[int, str]:
    """(bytes one device can hold, where the figure comes from): the allocator's limit on GPU / TPU;
    on CPU the host's memory shared by the local devices."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind} memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // jax.local_device_count(), f"host memory / {jax.local_device_count()} CPU devices"


def tree_bytes(tree, shardings=None) -> int:
    """Bytes of a tree of arrays (or ShapeDtypeStructs); with `shardings` (a matching tree of Shardings), the
    bytes one device holds of it."""
    leaves = jax.tree.leaves(tree)
    shapes = ([x.shape for x in leaves] if shardings is None else
              [sh.shard_shape(x.shape) for x, sh in zip(leaves, jax.tree.leaves(shardings), strict=True)])
    return sum(math.prod(shape) * jnp.dtype(x.dtype).itemsize for x, shape in zip(leaves, shapes, strict=True))
