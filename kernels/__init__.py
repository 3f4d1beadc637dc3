"""Kernels: the selective scan (several implementations behind one function) and friends.

Each kernel has a pure-jnp reference beside it; tests compare every implementation with it.
"""

from kernels.selective_scan import IMPLS, resolve_impl, selective_scan, selective_state_update

__all__ = ["IMPLS", "resolve_impl", "selective_scan", "selective_state_update"]
