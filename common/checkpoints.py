"""Reading the checkpoints of training runs (and checking them), below every model package, so a
model's own `load_checkpoint` can read a training workdir as well as a converted directory.

A training workdir holds orbax steps in `WORKDIR/checkpoints/<step>/` with three items (`state`:
step, params, optimizer state, rng; `data`: the data iterator's position; `meta`: the run's JSON
metadata). orbax writes each step into a temporary directory and renames it when complete, and marks
each finished item and step with `commit_success.txt`; once a step's write has finished,
`integrity.json` beside it records the size and sha256 of every file (`training.checkpoint` writes
it). A step is intact when the commit markers are there and the files match that record.

`restore_run_params` reads the newest intact step (or a given one) read-only; writing, restoring a
whole train state and moving damaged steps aside is `training.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from common.errors import UserError
from common.files import atomic_write_text

ITEMS = ("state", "data", "meta")
COMMIT_MARKER = "commit_success.txt"
INTEGRITY_FILE = "integrity.json"


class CheckpointDamagedError(UserError):
    """No checkpoint of the workdir restores completely."""


class CheckpointNotFoundError(UserError):
    """A path that should hold a training checkpoint holds none."""


@contextlib.contextmanager
def quiet_orbax():
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


def describe_exception(e: BaseException) -> str:
    """The exception's type and the first line of its message: what a damaged file made a reader raise."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


def checkpoints_root(path: str) -> str:
    """The directory of a workdir's steps: `path/checkpoints`, or `path` itself when it is that directory."""
    path = os.path.abspath(path)
    return os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path


def restore_run_params(path: str, abstract_params, step: int | None = None) -> tuple[dict, Any, int]:
    """(meta, params, step) from the newest intact checkpoint of a training workdir (or its
    checkpoints/ directory), or from `step`. Only the subtree of the parameters that
    `abstract_params` describes is restored (a partial tree is fine: e.g. a pre-trained encoder
    without its heads), in its leaves' dtypes, onto their shardings (a ShapeDtypeStruct's `sharding`; the
    first device where there is none); None restores no parameters. Read-only: a damaged
    newer step is skipped with a warning, not moved. Raises CheckpointNotFoundError when there is
    no checkpoint (or no such step)."""
    root = checkpoints_root(path)
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"{os.path.abspath(path)}: no such checkpoint directory")
    with quiet_orbax():
        mngr = ocp.CheckpointManager(root, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            return _newest_restorable(mngr, root, abstract_params, step)
        finally:
            mngr.close()


def _newest_restorable(mngr, root: str, abstract_params, wanted: int | None) -> tuple[dict, Any, int]:
    steps = sorted(mngr.all_steps(), reverse=True)
    if wanted is not None:
        if wanted not in steps:
            raise CheckpointNotFoundError(f"{root} has no checkpoint of step {wanted}; it holds steps {sorted(steps)}")
        steps = [wanted]
    problems = []
    for step in steps:
        problem = check_integrity(os.path.join(root, str(step)))
        if problem is None:
            try:
                meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                params = None if abstract_params is None else _restore_params(mngr, step, abstract_params)
            except Exception as e:  # damaged files: try the step before
                problem = describe_exception(e)
            else:
                for s, p in problems:
                    print(f"warning: checkpoint step {s} in {root} is damaged ({p}); using step {step}", flush=True)
                return meta, params, step
        problems.append((step, problem))
    if problems:
        raise CheckpointDamagedError(f"no checkpoint in {root} restores: "
                                     + "; ".join(f"step {s}: {p}" for s, p in problems))
    raise CheckpointNotFoundError(f"{root}: holds no training checkpoint")


def _restore_params(mngr, step: int, abstract_params):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=getattr(
        s, "sharding", None) or device), abstract_params)}
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(dtype=s.dtype, sharding=s.sharding), item)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))).state
    return state["params"]


def directory_digest(path: str, step: int | None = None) -> str:
    """Identifies a checkpoint's bytes cheaply: a training step's integrity record when there is one,
    else every file's path, size and modification time (a model rewritten in place changes it)."""
    h = hashlib.sha256()
    if step is not None:
        record = os.path.join(checkpoints_root(path), str(step), INTEGRITY_FILE)
        if os.path.exists(record):
            with open(record, "rb") as f:
                h.update(f.read())
            return h.hexdigest()[:32]
    for dirpath, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]
