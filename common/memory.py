"""How much memory a device has: what the pre-flights of training (`training.memory`) and serving
(`serving.engine`) hold their plans against before allocating anything."""

from __future__ import annotations

import os

import jax

GIB = 2**30


def device_memory_bytes() -> tuple[int, str]:
    """(bytes one device can hold, where the figure comes from): the allocator's limit on GPU / TPU;
    on CPU the host's memory shared by the local devices."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind} memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // jax.local_device_count(), f"host memory / {jax.local_device_count()} CPU devices"
