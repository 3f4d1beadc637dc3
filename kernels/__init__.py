"""Kernels: the selective scan (several implementations behind one function), the int8 matmul of
ExpertsInt8, and the platform they are traced for.

Each kernel has a pure-jnp reference beside it; tests compare every implementation with it and
lower every Pallas kernel for TPU and GPU (`target_platform`).
"""

from kernels.int8_matmul import int8_matmul
from kernels.platform import current_platform, target_platform
from kernels.selective_scan import IMPLS, KERNEL_PLATFORMS, resolve_impl, selective_scan, selective_state_update

__all__ = ["IMPLS", "KERNEL_PLATFORMS", "current_platform", "int8_matmul", "resolve_impl", "selective_scan",
           "selective_state_update", "target_platform"]
