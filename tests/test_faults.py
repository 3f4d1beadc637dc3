"""Fault injection: a run whose newest checkpoint is damaged resumes from the last good one and
reproduces the uninterrupted run; a run killed (SIGKILL) at random moments again and again ends with
the uninterrupted run's parameters and losses, each step logged once."""

import os
import random
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_training import read_metrics, small_config, train_losses

import tasks
from common.checkpoints import INTEGRITY_FILE, CheckpointDamagedError
from jamba_jax import load_checkpoint

STEPS, CUT = 8, 6  # the damaged runs stop after step 6 (checkpoints at 2, 4, 6), then resume to 8
HERE = os.path.dirname(os.path.abspath(__file__))


def config(**kw):
    return small_config(num_train_steps=STEPS, save_every_steps=2, eval_every_steps=STEPS, keep_checkpoints=5, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    tasks.run(config(), workdir)
    return train_losses(workdir), load_checkpoint(workdir)[1]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run left after step 6, as if killed there: checkpoints 2, 4 and 6 on disk."""
    from tasks.jamba_lm import JambaLMTask
    from training import train

    workdir = str(tmp_path_factory.mktemp("stopped"))
    c = config()
    train.run(JambaLMTask(c), c, workdir, stop_after=CUT)
    return workdir


def step6(workdir, *parts):
    return os.path.join(workdir, "checkpoints", str(CUT), *parts)


def truncate_largest_array(workdir):
    d = step6(workdir, "state", "ocdbt.process_0", "d")
    largest = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


DAMAGE = {
    "truncated_array_file": truncate_largest_array,
    "deleted_state_metadata": lambda w: os.remove(step6(w, "state", "_METADATA")),
    "deleted_data_iterator_state": lambda w: os.remove(step6(w, "data", "metadata")),
    "garbage_json_metadata": lambda w: open(step6(w, "meta", "metadata"), "w").write("{not json"),
    "missing_commit_marker": lambda w: os.remove(step6(w, "commit_success.txt")),
    # no integrity record (a kill before it was written): the damage shows only when orbax reads
    "truncated_without_integrity_record": lambda w: (os.remove(step6(w, INTEGRITY_FILE)),
                                                     truncate_largest_array(w)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_past_a_damaged_checkpoint(damage, stopped, reference, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    assert os.path.exists(step6(workdir, INTEGRITY_FILE))  # written when the run closed
    DAMAGE[damage](workdir)
    tasks.run(config(), workdir)
    captured = capsys.readouterr()
    out = captured.out
    assert f"checkpoint step {CUT} is damaged" in out and "resumed from" in out and "at step 4" in out, out
    assert (out + captured.err).count("is damaged") == 1  # one warning, not one per logging channel
    assert os.listdir(os.path.join(workdir, "checkpoints.damaged"))  # kept for inspection
    ref_losses, ref_params = reference
    assert train_losses(workdir) == ref_losses  # steps 5 and 6 redone, identically
    for a, b in zip(jax.tree.leaves(load_checkpoint(workdir)[1]), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [m["step"] for m in read_metrics(workdir) if "loss" in m]
    assert steps == sorted(set(steps)) == list(range(1, STEPS + 1))  # each step logged once


def test_when_no_checkpoint_restores_every_step_is_named(stopped, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    for step in (2, 4, 6):
        os.remove(os.path.join(workdir, "checkpoints", str(step), "data", "metadata"))
    with pytest.raises(CheckpointDamagedError, match=r"step 6: .*step 4: .*step 2: "):
        tasks.run(config(), workdir)


def _worker(workdir, steps):
    cmd = [sys.executable, os.path.join(HERE, "mesh_worker.py"), "--devices", "1", "--mesh", '{"data": 1}',
           "--workdir", workdir, "--steps", str(steps), "--save-every", "1"]
    # the suite's persistent compilation cache (conftest), every program in it: each restart reaches
    # training in seconds, not a compile later
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return cmd, env


def logged_steps(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum('"loss"' in line for line in f)


def test_repeated_sigkills_reproduce_the_uninterrupted_run(tmp_path):
    """Kills land in training: each waits until the run has logged 1-2 more steps, then a random
    fraction of a step (checkpoints are written every step, so most land in or between saves)."""
    steps = 24
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    cmd, env = _worker(ref_dir, steps)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    rng = random.Random(0)
    cmd, env = _worker(run_dir, steps)
    at = []  # steps logged when each kill came
    while len(at) < 10:
        target = logged_steps(run_dir) + rng.randint(1, 2)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while logged_steps(run_dir) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is not None:
            pytest.fail(f"the run ended before kill {len(at) + 1} (logged {logged_steps(run_dir)} steps)")
        proc.kill()
        proc.wait()
        at.append(logged_steps(run_dir))
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)  # the last resume, to the end
    assert max(at) > 3, at  # the kills came during training, not at start-up
    print("steps logged at each kill:", at)
    assert train_losses(run_dir) == train_losses(ref_dir)
    steps_logged = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps_logged == list(range(1, steps + 1)), steps_logged
    for a, b in zip(jax.tree.leaves(load_checkpoint(run_dir)[1]), jax.tree.leaves(load_checkpoint(ref_dir)[1]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
