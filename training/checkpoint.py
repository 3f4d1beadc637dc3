"""Orbax checkpoints of the whole run: train state, data-iterator position and run metadata, with
an integrity record, and a restore that walks back past damaged checkpoints (the layout and the
integrity checks are `common.checkpoints`').

Restoring takes the newest step whose files pass those checks (commit markers present, sizes and
digests as recorded) and that restores completely (state, data position, metadata); a damaged step
is named in one warning and moved to `checkpoints.damaged/` (kept for inspection, out of the way
of the step's next save). Only when no step restores is it an error, listing each step and why.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from common.checkpoints import ITEMS, CheckpointDamagedError, check_integrity, describe_exception, write_integrity
from common.errors import UserError

MAX_LISTED_DIFFERENCES = 4  # of a mismatched configuration, the error names these many
PROVENANCE = "provenance"  # a meta entry recorded with every checkpoint but not compared on resume


class CheckpointMismatchError(UserError):
    """The workdir holds a checkpoint of a different model or task."""


class Checkpointer:
    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.damaged_directory = self.directory + ".damaged"
        self._keep, self._async = keep, async_save
        self._pending: int | None = None  # a saved step whose integrity record is not written yet
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                               enable_async_checkpointing=self._async)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self._finish_pending()
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))
        self._pending = step

    def _finish_pending(self) -> None:
        """Waits for the last save to finish and writes its integrity record (process 0)."""
        if self._pending is None:
            return
        self._mngr.wait_until_finished()
        step, self._pending = self._pending, None
        if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
            write_integrity(self.step_dir(step))

    def restore_latest(self, abstract_state, meta: dict) -> tuple[int | None, Any, dict | None]:
        """(step, state, data position) of the newest checkpoint that is intact and restores, or
        (None, None, None) when there is none. A checkpoint of another configuration is refused
        (CheckpointMismatchError); damaged ones are moved aside with a warning."""
        problems = []
        for step in sorted(self._mngr.all_steps(), reverse=True):
            problem = check_integrity(self.step_dir(step))
            if problem is None:
                try:
                    self._check_meta(step, meta)
                    r = self._mngr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
                    if not isinstance(r.data, dict):
                        raise ValueError("the data-iterator position is not a JSON object")
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # whatever a damaged file makes orbax / tensorstore raise
                    problem = describe_exception(e)
                else:
                    if problems:
                        self._quarantine(problems)
                    return step, r.state, r.data
            problems.append((step, problem))
        if problems:
            raise CheckpointDamagedError(
                f"no checkpoint in {self.directory} restores: " + "; ".join(f"step {s}: {p}" for s, p in problems)
                + ". Move the directory away to start afresh.")
        return None, None, None

    def _quarantine(self, problems) -> None:
        """Moves damaged steps out of the manager's directory (their step numbers will be saved again)."""
        os.makedirs(self.damaged_directory, exist_ok=True)
        for step, problem in problems:
            target = os.path.join(self.damaged_directory, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            if jax.process_index() == 0:
                shutil.move(self.step_dir(step), target)
            print(f"warning: checkpoint step {step} is damaged ({problem}); moved to {target}", flush=True)
        self._mngr.close()
        self._open()

    def _check_meta(self, step: int, meta: dict) -> None:
        saved = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(saved, dict):
            raise ValueError("the run metadata is not a JSON object")
        if saved.get("task") != meta.get("task"):
            raise CheckpointMismatchError(
                f"{self.directory} holds a checkpoint (step {step}) of task {saved.get('task')!r}, not "
                f"{meta.get('task')!r}: use a new --workdir")
        diffs = config_differences({k: v for k, v in saved.items() if k != PROVENANCE},
                                   {k: v for k, v in meta.items() if k != PROVENANCE})
        if diffs:
            listed = "; ".join(diffs[:MAX_LISTED_DIFFERENCES])
            more = f" (and {len(diffs) - MAX_LISTED_DIFFERENCES} more)" if len(diffs) > MAX_LISTED_DIFFERENCES else ""
            raise CheckpointMismatchError(
                f"{self.directory} holds a checkpoint (step {step}) of a different configuration: {listed}{more}. "
                "Use a new --workdir, or restore the original config.")

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        self._finish_pending()
        self._mngr.close()


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: checkpoint has A, config has B' for every leaf where two metadata dicts differ."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and a == list(b)):
            out.append(f"{prefix}{k}: checkpoint has {_short(a)}, config has {_short(b)}")
    return out


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
