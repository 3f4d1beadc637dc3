"""Multi-host start-up: `jax.distributed.initialize` when the config or the environment asks.

config.distributed.initialize = True joins the processes before JAX touches a device:
  coordinator_address "" -> jax.distributed.initialize() detects the cluster itself (Cloud TPU
                            pod slices, SLURM, Open MPI)
  coordinator_address "host:port" with num_processes and process_id -> an explicit cluster (GPU
                            nodes, or several CPU processes on one machine, as the tests do)
A JAX_COORDINATOR_ADDRESS environment variable also turns it on (with JAX_NUM_PROCESSES and
JAX_PROCESS_ID). CPU processes exchange collectives through gloo.
"""

from __future__ import annotations

import os

import jax

from common.errors import UserError


class DistributedConfigError(UserError):
    """The distributed fields of the config are inconsistent."""


def initialize(config) -> bool:
    """Joins the cluster if asked; returns whether it did. Call before any other JAX work."""
    d = config.get("distributed", None)
    address = (d.coordinator_address if d is not None else "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    wanted = bool(address) or (d is not None and d.initialize)
    if not wanted:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
    if not address:
        jax.distributed.initialize()
        return True
    num = d.num_processes if d is not None and d.num_processes > 0 else int(os.environ.get("JAX_NUM_PROCESSES", -1))
    pid = d.process_id if d is not None and d.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    if num <= 0 or not 0 <= pid < num:
        raise DistributedConfigError(f"coordinator_address={address!r} needs num_processes > 0 and 0 <= process_id < "
                                     f"num_processes; got num_processes={num}, process_id={pid}")
    jax.distributed.initialize(address, num_processes=num, process_id=pid)
    return True
