"""Orbax checkpoints of the whole run: train state, data-iterator position and run metadata, with
an integrity record, and a restore that walks back past damaged checkpoints.

orbax writes each step into a temporary directory and renames it when complete (a run killed
mid-write leaves no half checkpoint), and marks each finished item and step with
`commit_success.txt`. Once a step's write has finished, `integrity.json` beside it records the size
and sha256 of every file of the step; the write of the next checkpoint (or the end of the run)
is when that happens, since saves are asynchronous.

Restoring takes the newest step whose files pass those checks (commit markers present, sizes and
digests as recorded) and that restores completely (state, data position, metadata); a damaged step
is named in one warning and moved to `checkpoints.damaged/` (kept for inspection, out of the way
of the step's next save). Only when no step restores is it an error, listing each step and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from common.errors import UserError
from common.files import atomic_write_text

ITEMS = ("state", "data", "meta")
COMMIT_MARKER = "commit_success.txt"
INTEGRITY_FILE = "integrity.json"
_LOG = logging.getLogger("training")


class CheckpointMismatchError(UserError):
    """The workdir holds a checkpoint of a different model or task."""


class CheckpointDamagedError(UserError):
    """No checkpoint of the workdir restores completely."""


class CheckpointNotFoundError(UserError):
    """A path that should hold a training checkpoint holds none."""


@contextlib.contextmanager
def _quiet_orbax():
    """Silences orbax's INFO / WARNING chatter (e.g. 'Given directory is read only') while reading."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _files(step_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), step_dir)
            if rel != INTEGRITY_FILE:
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_integrity(step_dir: str) -> None:
    """Records {file: [size, sha256]} of a finished step in step_dir/integrity.json (atomically)."""
    record = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _sha256(os.path.join(step_dir, rel))]
              for rel in _files(step_dir)}
    atomic_write_text(os.path.join(step_dir, INTEGRITY_FILE), json.dumps(record, indent=0, sort_keys=True))


def check_integrity(step_dir: str) -> str | None:
    """What is wrong with a step's files, or None: commit markers, then the recorded sizes and digests."""
    for where in ("",) + ITEMS:
        if not os.path.exists(os.path.join(step_dir, where, COMMIT_MARKER)):
            return f"orbax's commit marker {os.path.join(where, COMMIT_MARKER)} is missing"
    path = os.path.join(step_dir, INTEGRITY_FILE)
    if not os.path.exists(path):
        return None  # written once the next save starts: the newest step may not have it yet
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return f"{INTEGRITY_FILE} is unreadable ({e})"
    for rel, (size, digest) in record.items():
        full = os.path.join(step_dir, rel)
        if not os.path.exists(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were written"
        if _sha256(full) != digest:
            return f"{rel} does not hold the bytes that were written (sha256 differs)"
    return None


def _describe(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


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
                    problem = _describe(e)
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
            _LOG.warning("checkpoint step %d is damaged (%s); moved it to %s and resumed from an earlier step",
                         step, problem, target)
            print(f"warning: checkpoint step {step} is damaged ({problem}); moved to {target}", flush=True)
        self._mngr.close()
        self._open()

    def _check_meta(self, step: int, meta: dict) -> None:
        saved = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(saved, dict):
            raise ValueError("the run metadata is not a JSON object")
        diffs = _diff(saved, meta)
        if diffs:
            raise CheckpointMismatchError(
                f"{self.directory} holds a checkpoint (step {step}) of a different configuration: {'; '.join(diffs)}. "
                "Use a new --workdir, or restore the original config.")

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        self._finish_pending()
        self._mngr.close()


def restore_run_params(path: str, abstract_params, step: int | None = None) -> tuple[dict, Any, int]:
    """(meta, params, step) from the newest intact checkpoint of a training workdir (or its
    checkpoints/ directory), or from `step`. Only the subtree of the parameters that
    `abstract_params` describes is restored (a partial tree is fine: e.g. a pre-trained encoder
    without its heads), onto the first device; None restores no parameters. Read-only: a damaged
    newer step is skipped with a warning, not moved. Raises CheckpointNotFoundError when there is
    no checkpoint (or no such step)."""
    wanted = step
    path = os.path.abspath(path)
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    with _quiet_orbax():
        mngr = ocp.CheckpointManager(root, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            problems = []
            steps = sorted(mngr.all_steps(), reverse=True)
            if wanted is not None:
                if wanted not in steps:
                    raise CheckpointNotFoundError(f"{root} has no checkpoint of step {wanted}; it holds steps "
                                                  f"{sorted(steps)}")
                steps = [wanted]
            for step in steps:
                problem = check_integrity(os.path.join(root, str(step)))
                if problem is None:
                    try:
                        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                        params = None if abstract_params is None else _restore_params(mngr, step, abstract_params)
                    except Exception as e:  # damaged files: try the step before
                        problem = _describe(e)
                    else:
                        for s, p in problems:
                            print(f"warning: checkpoint step {s} in {root} is damaged ({p}); using step {step}",
                                  flush=True)
                        return meta, params, step
                problems.append((step, problem))
            if problems:
                raise CheckpointDamagedError(f"no checkpoint in {root} restores: "
                                             + "; ".join(f"step {s}: {p}" for s, p in problems))
            raise CheckpointNotFoundError(f"{root}: holds no training checkpoint")
        finally:
            mngr.close()


def _restore_params(mngr, step: int, abstract_params):
    item = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params)}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(dtype=s.dtype, sharding=device), item)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))).state
    return state["params"]


def _diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and a == list(b)):
            out.append(f"{prefix}{k}: checkpoint has {a!r}, config has {b!r}")
    return out
