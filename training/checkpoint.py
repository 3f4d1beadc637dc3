"""Orbax checkpoints of the whole run: train state, data-iterator position and run metadata.

orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-write leaves the previous checkpoint as the latest usable one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model or task."""


class Checkpointer:
    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))

    def check_meta(self, step: int, meta: dict) -> None:
        saved = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        diffs = _diff(saved, meta)
        if diffs:
            raise CheckpointMismatchError(
                f"{self.directory} holds a checkpoint (step {step}) of a different configuration: {'; '.join(diffs)}. "
                "Use a new --workdir, or restore the original config.")

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        r = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return r.state, r.data

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()


def restore_run_params(path: str, abstract_params) -> tuple[dict, Any, int]:
    """(meta, params, step) from the latest checkpoint of a training workdir (or its checkpoints/
    directory). Only the subtree of the parameters that `abstract_params` describes is restored (a
    partial tree is fine: e.g. a pre-trained encoder without its heads), onto the first device;
    None restores no parameters. Raises FileNotFoundError when there is no checkpoint."""
    path = os.path.abspath(path)
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    mngr = ocp.CheckpointManager(root, item_names=("state", "data", "meta"),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{root}: holds no training checkpoint")
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if abstract_params is None:
            return meta, None, step
        item = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params)}
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(dtype=s.dtype, sharding=device), item)
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))).state
    finally:
        mngr.close()
    return meta, state["params"], step


def _diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and a == list(b)):
            out.append(f"{prefix}{k}: checkpoint has {a!r}, config has {b!r}")
    return out
