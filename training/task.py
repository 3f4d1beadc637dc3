"""The contract between a task and the one training loop (`training.train.run`).

A task owns its model, data, loss and evaluation; the loop owns everything else (mesh, sharded
init, optimizer state, restore-or-init, the jitted step, metrics, checkpoints, progress), the same
way for every model. `tasks/<name>.py` exports the class as `Task`.

Frozen inputs (big_vision's distillation pattern: the teacher loaded beside the student) are arrays
the loss needs that nothing trains, such as the frozen LM of auxiliary tuning. The loop passes them
to `loss` and `eval_sums` as an argument that is never differentiated (`jax.value_and_grad` of the
parameters alone, so no activations of their forward pass are kept for a backward pass), gives them
no optimizer state, places them by their own logical specs, and never writes them into run
checkpoints: the run's metadata records their source and digest, and a resume against other frozen
arrays is refused by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

Params = Any  # a pytree of arrays


@dataclasses.dataclass(frozen=True)
class FrozenInputs:
    arrays: Any  # pytree of arrays the loss reads and nothing trains
    source: str  # where they came from (a checkpoint path and step), recorded in run checkpoints
    specs: Any = None  # logical PartitionSpecs of `arrays` (None: replicated on every device)
    digest: str = ""  # identifies the values; `digest_of(arrays)` when left empty

    def record(self) -> dict[str, str]:
        """What run checkpoints record of these inputs (a resume must find the same)."""
        return {"source": self.source, "digest": self.digest or digest_of(self.arrays)}


@runtime_checkable
class Task(Protocol):
    name: str

    def meta(self) -> dict:
        """JSON-able description that a checkpoint must match to be resumed (task, model config)."""

    def init_params(self, rng: jax.Array) -> Params:
        """The trainable parameters, freshly initialised (or loaded: a fine-tuning start)."""

    def loss(self, params: Params, batch: dict, rng: jax.Array | None, frozen: Any) -> tuple[jax.Array, dict]:
        """(objective summed over targets, metrics summed likewise); metrics include "tokens", the
        number of targets (the loop divides by it). `frozen` is `frozen_inputs().arrays` or None."""

    def train_dataset(self, process_index: int, process_count: int):
        """A grain IterDataset of dict batches: this process's rows of each global batch."""

    def eval_dataset(self, process_index: int, process_count: int):
        """The same for evaluation; batches may end in all-zero rows, which must count for nothing."""

    def eval_sums(self, params: Params, batch: dict, frozen: Any) -> dict:
        """{"nll": sum, "tokens": count, optional sums k with counts "k_n"} (eval_loss, eval_k)."""

    def on_end(self, params: Params, frozen: Any) -> None:
        """Called once when training completes (e.g. print a sample)."""


class OptionalTaskMethods(Protocol):
    """What a task may add; the loop checks with hasattr."""

    def param_specs(self) -> Any:
        """Logical PartitionSpecs of the parameters (default: replicated)."""

    def frozen_inputs(self) -> FrozenInputs | None:
        """Arrays the loss needs that are not trained (default: none)."""

    def extra_eval(self, params: Params, frozen: Any) -> dict:
        """Evaluation the jitted eval_sums cannot do (sampling, text matching), run on the host at each
        eval; each value k is reported as eval_k."""

    def optimizer(self, config) -> Any:
        """An optax transformation replacing `training.optim.make_optimizer(config)` (e.g. one that
        trains only part of the parameters)."""


def digest_of(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (each leaf copied to the host in turn)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:32]
