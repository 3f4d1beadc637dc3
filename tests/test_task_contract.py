"""The Task contract of the shared loop (training/task.py), on a task small enough to reason about:
frozen inputs reach the loss as data (no gradient, no optimizer state, not in checkpoints), their
source and digest are recorded and a resume against other ones is refused; a task's own optimizer
replaces AdamW; tasks are found by convention and an unknown one lists them."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import tasks
from configs import jamba_tiny
from training import train
from training.checkpoint import CheckpointMismatchError
from training.optim import make_optimizer
from training.step import make_train_step
from training.task import FrozenInputs, Task, digest_of

D = 6


def linear_rows(seed: int, n: int):
    r = np.random.RandomState(seed)
    return [{"x": r.randn(D).astype(np.float32), "y": np.float32(r.randn())} for _ in range(n)]


class TeacherStudentTask:
    """A student vector w learns y - x . teacher, where `teacher` is a frozen input: the target the
    student sees depends on the frozen values, so using them wrongly cannot go unnoticed."""

    name = "teacher_student"

    def __init__(self, teacher: np.ndarray, optimizer=None):
        self.teacher = teacher
        self._optimizer = optimizer

    def meta(self):
        return {"task": self.name}

    def init_params(self, rng):
        return {"w": jnp.zeros((D,), jnp.float32)}

    def frozen_inputs(self):
        return FrozenInputs({"teacher": jnp.asarray(self.teacher)}, source="test teacher")

    def _dataset(self, seed, n, train_):
        ds = grain.MapDataset.source(linear_rows(seed, n))
        if train_:
            ds = ds.repeat(None)
        return ds.batch(8, drop_remainder=train_).to_iter_dataset()

    def train_dataset(self, process_index, process_count):
        return self._dataset(0, 64, True)

    def eval_dataset(self, process_index, process_count):
        return self._dataset(1, 16, False)

    def _sums(self, params, batch, frozen):
        residual = batch["y"] - batch["x"] @ frozen["teacher"] - batch["x"] @ params["w"]
        return jnp.sum(residual ** 2), jnp.asarray(batch["y"].shape[0], jnp.float32)

    def loss(self, params, batch, rng, frozen):
        sq, n = self._sums(params, batch, frozen)
        return sq, {"loss": sq, "tokens": n}

    def eval_sums(self, params, batch, frozen):
        sq, n = self._sums(params, batch, frozen)
        return {"nll": sq, "tokens": n}

    def on_end(self, params, frozen):
        self.ended_with = (params, frozen)

    def optimizer(self, config):  # the optional hook; without one of its own, the loop's AdamW
        return self._optimizer or make_optimizer(config)


def loop_config(**overrides):
    c = jamba_tiny.get_config()
    c.num_train_steps, c.warmup_steps, c.learning_rate, c.weight_decay = 6, 1, 0.05, 0.0
    c.log_every_steps = c.eval_every_steps = c.save_every_steps = 3
    c.eval_batches = 2
    for k, v in overrides.items():
        c[k] = v
    return c


def test_frozen_inputs_are_data_not_state(tmp_path):
    teacher = np.arange(D, dtype=np.float32)
    task = TeacherStudentTask(teacher)
    assert isinstance(task, Task)
    workdir = str(tmp_path)
    train.run(task, loop_config(), workdir)

    # the step differentiates the parameters alone: optimizer state has no [D] teacher-shaped twin
    # of anything but w, and the checkpoint holds no teacher
    root = os.path.join(workdir, "checkpoints")
    with ocp.CheckpointManager(root, item_names=("state", "data", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        step = mngr.latest_step()
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    assert set(state["params"]) == {"w"}
    flat_keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert not any("teacher" in k for k in flat_keys), flat_keys
    assert meta["frozen_inputs"] == {"source": "test teacher", "digest": digest_of({"teacher": teacher})}
    params, frozen = task.ended_with
    np.testing.assert_array_equal(np.asarray(frozen["teacher"]), teacher)
    assert float(jnp.abs(params["w"]).sum()) > 0  # the student moved

    # resuming against another teacher is refused by name
    with pytest.raises(CheckpointMismatchError, match="frozen_inputs.digest"):
        train.run(TeacherStudentTask(teacher + 1), loop_config(num_train_steps=9), workdir)


def test_the_loss_sees_the_frozen_values_and_no_gradient_flows_into_them():
    teacher = np.linspace(-1, 1, D).astype(np.float32)
    task = TeacherStudentTask(teacher)
    batch = jax.tree.map(lambda *xs: np.stack(xs), *linear_rows(3, 8))
    frozen = task.frozen_inputs().arrays
    params = task.init_params(None)
    step = make_train_step(task, optax.sgd(0.1), 1)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optax.sgd(0.1).init(params),
             "rng": jax.random.PRNGKey(0)}
    new_state, _ = jax.jit(step)(state, batch, frozen)
    # one SGD step on w from zero: w = 0.1 * 2 * sum_i (y_i - x_i . teacher) x_i / n
    r = batch["y"] - batch["x"] @ teacher
    np.testing.assert_allclose(np.asarray(new_state["params"]["w"]), 0.1 * 2 * (r @ batch["x"]) / 8, rtol=1e-5)


def test_a_task_optimizer_replaces_adamw(tmp_path):
    frozen_w = optax.multi_transform({"train": optax.sgd(0.1), "freeze": optax.set_to_zero()},
                                     {"w": "freeze"})
    task = TeacherStudentTask(np.ones(D, np.float32), optimizer=frozen_w)
    train.run(task, loop_config(), str(tmp_path))
    params, _ = task.ended_with
    np.testing.assert_array_equal(np.asarray(params["w"]), np.zeros(D))  # its optimizer trains nothing


def test_tasks_are_found_by_convention_and_an_unknown_one_lists_them(tmp_path):
    found = tasks.available()
    assert {"jamba_lm", "generate", "sensebert_pretrain", "sensebert_tagging", "sensebert_wic"} <= set(found)
    assert "sensebert_common" not in found and "sensebert_predict" not in found  # export neither Task nor run
    with pytest.raises(tasks.UnknownTaskError, match=r"unknown task 'nope'.*'jamba_lm'"):
        tasks.run(loop_config(task="nope"), str(tmp_path))


def test_task_exports_are_read_from_top_level_definitions_only(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text('"""A task.\n\n    def run(config, workdir) in an indented docstring line."""\n'
                                   "class Task(Base):\n    def run(self): ...\n")
    (tmp_path / "b.py").write_text("def run_pool(x): ...\nrunner = 1\nTaskish = 2\nif Task == 3: pass\n"
                                   "    def run(config, workdir): ...\n")
    (tmp_path / "c.py").write_text("from x import JambaTask\nTask: type = JambaTask\nrun=lambda c, w: None\n")
    monkeypatch.setattr(tasks, "_HERE", str(tmp_path))
    assert tasks._exports("a") == {"Task"}
    assert tasks._exports("b") == set()
    assert tasks._exports("c") == {"Task", "run"}
    assert tasks.available() == ["a", "c"]
