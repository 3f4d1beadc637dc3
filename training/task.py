"""The contract between a task and the one training loop (`training.train.run`): the `Task` base class.

A task owns its model, data, loss and evaluation; the loop owns everything else (mesh, sharded
init, optimizer state, restore-or-init, the jitted step, metrics, checkpoints, progress), the same
way for every model. `tasks/<name>.py` exports its subclass as `Task`. A subclass implements
`init_params`, `dataset` (or `train_dataset` and `eval_dataset`) and `sums`; every other method has a
default here, so the loop calls each one unconditionally.

`sums` is the one per-batch computation: summed quantities over the batch's targets. The loop
differentiates its "objective" (or "loss" when there is none) in training, reports each other sum k
divided by its count "k_n" (or by "tokens") as a training metric, and, at evaluation (rng None),
reports "loss" / "tokens" as eval_loss (and eval_perplexity) and every other sum likewise as eval_k.

Frozen inputs (big_vision's distillation pattern: the teacher loaded beside the student) are arrays
the loss needs that nothing trains, such as the frozen LM of auxiliary tuning. The loop passes them
to `sums` as an argument that is never differentiated (`jax.value_and_grad` of the parameters alone,
so no activations of their forward pass are kept for a backward pass), gives them no optimizer
state, places them by their own logical specs, and never writes them into run checkpoints: the
run's metadata records their source and digest, and a resume against other frozen arrays is refused
by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from training.optim import make_optimizer

Params = Any  # a pytree of arrays


@dataclasses.dataclass(frozen=True)
class FrozenInputs:
    arrays: Any  # pytree of arrays the loss reads and nothing trains (with `load`: their ShapeDtypeStructs)
    source: str  # where they came from (a checkpoint path and step), recorded in run checkpoints
    specs: Any = None  # logical PartitionSpecs of `arrays` (None: replicated on every device)
    digest: str = ""  # identifies the values; `digest_of(arrays)` when left empty
    load: Any = None  # load(shardings) -> the arrays placed on them (a checkpoint streamed onto the mesh)

    def record(self) -> dict[str, str]:
        """What run checkpoints record of these inputs (a resume must find the same)."""
        return {"source": self.source, "digest": self.digest or digest_of(self.arrays)}


class Task:
    """What a task gives the loop. Subclasses set `name` and implement the four methods that raise."""

    name: str = "task"
    eval_split: str = "validation"  # the split `eval_dataset` reads

    # --- what every task implements -------------------------------------------------------------------
    def init_params(self, rng: jax.Array) -> Params:
        """The trainable parameters, freshly initialised (their shapes also come from here)."""
        raise NotImplementedError

    def initial_params(self, shardings) -> Params | None:
        """A fine-tuning start: the parameters loaded from a checkpoint straight into `shardings` (the
        train state's, a tree like the parameters), or None (default) to start from `init_params`. Called
        only when the run has no checkpoint of its own to resume."""
        return None

    def dataset(self, split: str, train: bool, process_index: int, process_count: int):
        """A grain IterDataset of dict batches of `split`: this process's rows of each global batch; for
        training endless and shuffled, for evaluation one pass whose last batch may end in all-zero rows,
        which must count for nothing."""
        raise NotImplementedError

    def train_dataset(self, process_index: int, process_count: int):
        return self.dataset("train", True, process_index, process_count)

    def eval_dataset(self, process_index: int, process_count: int):
        return self.dataset(self.eval_split, False, process_index, process_count)

    def sums(self, params: Params, batch: dict, rng: jax.Array | None, frozen: Any) -> dict[str, jax.Array]:
        """Sums over the batch's targets: "loss" (e.g. the summed NLL), "tokens" (the number of targets),
        optionally "objective" (what training differentiates, if not "loss"), and any other sum k with an
        optional count "k_n". rng is None at evaluation (no dropout); `frozen` is `frozen_inputs().arrays`."""
        raise NotImplementedError

    # --- what the loop calls, derived from `sums` -------------------------------------------------------
    def loss(self, params: Params, batch: dict, rng: jax.Array | None, frozen: Any) -> tuple[jax.Array, dict]:
        """(the objective to differentiate, the sums beside it)."""
        sums = dict(self.sums(params, batch, rng, frozen))
        return sums.pop("objective", sums["loss"]), sums

    def eval_sums(self, params: Params, batch: dict, frozen: Any) -> dict[str, jax.Array]:
        sums = dict(self.sums(params, batch, None, frozen))
        sums.pop("objective", None)
        return sums

    # --- hooks with defaults ---------------------------------------------------------------------------------
    def meta(self) -> dict:
        """JSON-able description that a checkpoint must match to be resumed (task, model config); a top-level
        "provenance" entry is recorded but not compared (where a fine-tuning run started from)."""
        return {"task": self.name}

    def param_specs(self, params: Params) -> Any:
        """Logical PartitionSpecs of the parameters (`params` may be abstract); default: replicated."""
        return jax.tree.map(lambda _: PartitionSpec(), params)

    def frozen_inputs(self) -> FrozenInputs | None:
        """Arrays the loss needs that are not trained; default: none."""
        return None

    def optimizer(self, config) -> Any:
        """The optax transformation that trains the parameters; default: AdamW as the config says."""
        return make_optimizer(config)

    def activation_bytes(self, rows: int, seq_len: int, context_shards: int = 1) -> int:
        """Estimated activation memory of a training step for `rows` rows per device of `seq_len` tokens,
        each row's tokens split over `context_shards` devices (context parallelism); the memory pre-flight
        adds it to the state's bytes. Default: 0 (unknown)."""
        return 0

    def extra_eval(self, params: Params, frozen: Any) -> dict[str, float]:
        """Evaluation the jitted `sums` cannot do (sampling, text matching), run on the host at each eval;
        each value k is reported as eval_k. Default: none."""
        return {}

    def on_end(self, params: Params, frozen: Any) -> None:
        """Called once when training completes (e.g. print a sample); default: nothing."""


def digest_of(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (each leaf copied to the host in turn)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:32]
