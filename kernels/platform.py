"""Which platform the kernels are traced for, and therefore which kernel `impl="auto"` picks and
whether a Pallas kernel runs compiled or in interpret mode.

By default that is the platform JAX runs on (`jax.default_backend()`, with "cuda" and "rocm" read
as "gpu"). `target_platform("tpu")` (or "gpu", "cpu") overrides it while tracing, so a test on a
CPU box can build and lower exactly the program a TPU or GPU would compile:

    with target_platform("tpu"):
        jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))

Inside `target_platform("gpu")` or `("tpu")` on a machine of another kind, an abstract H100 or
TPU v5p is installed as the abstract mesh's device. The kernel lowerings ask the device what it is
(from jax 0.11 the Pallas Triton lowering needs a compute capability; Mosaic reads the TPU
generation), and the abstract mesh is part of JAX's tracing-cache key, so a function traced for
one platform is never reused for another.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_LOG = logging.getLogger("kernels")
_state = threading.local()
_logged: set[tuple[str, str]] = set()


def _backend_platform() -> str:
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def current_platform() -> str:
    """The platform being traced for: the innermost `target_platform`, else JAX's default backend."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _backend_platform()


def interpret_mode() -> bool:
    """True when Pallas kernels must run in interpret mode: tracing for a CPU on a CPU."""
    return current_platform() == "cpu"


_ABSTRACT_DEVICES = {"gpu": dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
                     "tpu": dict(device_kind="TPU v5", num_cores=1, platform="tpu")}


def _abstract_mesh(name: str):
    """The current abstract mesh with an abstract `name` device (a 1-device mesh if none)."""
    device = jax.sharding.AbstractDevice(**_ABSTRACT_DEVICES[name])
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jax.sharding.AbstractMesh((1,), ("_kernel_target",), abstract_device=device)
    return jax.sharding.AbstractMesh(mesh.axis_sizes, mesh.axis_names, mesh.axis_types, abstract_device=device)


@contextlib.contextmanager
def target_platform(name: str):
    """Trace (and lower) kernels for platform `name` ("cpu", "gpu" or "tpu") inside this block."""
    if name not in PLATFORMS:
        raise ValueError(f"target_platform({name!r}): expected one of {PLATFORMS}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        needs_device = name in _ABSTRACT_DEVICES and _backend_platform() != name
        with jax.sharding.use_abstract_mesh(_abstract_mesh(name)) if needs_device else contextlib.nullcontext():
            yield name
    finally:
        stack.pop()


def log_once(kind: str, message: str) -> None:
    """Logs `message` (a kernel choice worth knowing about) once per process and kind."""
    key = (kind, message)
    if key not in _logged:
        _logged.add(key)
        _LOG.warning(message)
