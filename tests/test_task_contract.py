"""The Task base class of the shared loop (training/task.py), on a task small enough to reason about:
frozen inputs reach the loss as data (no gradient, no optimizer state, not in checkpoints), their
source and digest are recorded and a resume against other ones is refused; a task's own optimizer
replaces AdamW; the loop's loss and evaluation follow from one `sums`; tasks are found by import and an
unknown one lists them."""

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


class TeacherStudentTask(Task):
    """A student vector w learns y - x . teacher, where `teacher` is a frozen input: the target the
    student sees depends on the frozen values, so using them wrongly cannot go unnoticed."""

    name = "teacher_student"

    def __init__(self, teacher: np.ndarray, optimizer=None):
        self.teacher = teacher
        self._optimizer = optimizer

    def init_params(self, rng):
        return {"w": jnp.zeros((D,), jnp.float32)}

    def frozen_inputs(self):
        return FrozenInputs({"teacher": jnp.asarray(self.teacher)}, source="test teacher")

    def dataset(self, split, train_, process_index, process_count):
        ds = grain.MapDataset.source(linear_rows(0, 64) if split == "train" else linear_rows(1, 16))
        if train_:
            ds = ds.repeat(None)
        return ds.batch(8, drop_remainder=train_).to_iter_dataset()

    def sums(self, params, batch, rng, frozen):
        residual = batch["y"] - batch["x"] @ frozen["teacher"] - batch["x"] @ params["w"]
        return {"loss": jnp.sum(residual ** 2), "tokens": jnp.asarray(batch["y"].shape[0], jnp.float32),
                "abs_error": jnp.sum(jnp.abs(residual))}

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
    workdir = str(tmp_path)
    metrics = train.run(task, loop_config(), workdir)
    assert {"loss", "abs_error", "eval_loss", "eval_abs_error"} <= set(metrics)  # both from one `sums`

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


def test_a_finished_run_says_so_and_another_tasks_workdir_is_named_first(tmp_path, capsys):
    task, workdir = TeacherStudentTask(np.ones(D, np.float32)), str(tmp_path)
    train.run(task, loop_config(), workdir)
    capsys.readouterr()
    train.run(task, loop_config(), workdir)  # nothing left to do
    assert "this run is complete" in capsys.readouterr().out

    class OtherTask(TeacherStudentTask):
        name = "other"

        def meta(self):
            return {"task": self.name, "model": {f"field_{i}": i for i in range(200)}}  # a long config

    with pytest.raises(CheckpointMismatchError) as e:
        train.run(OtherTask(np.ones(D, np.float32)), loop_config(num_train_steps=9), workdir)
    message = str(e.value)
    assert "of task 'teacher_student', not 'other'" in message and len(message) < 300, message


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


def test_the_base_class_gives_every_hook_a_default():
    """What a task does not define, the loop still calls: replicated specs, no frozen inputs, AdamW, no
    activation estimate, no extra evaluation, nothing at the end; loss and eval_sums come from sums."""

    class Minimal(Task):
        def sums(self, params, batch, rng, frozen):
            return {"loss": jnp.sum(params["w"] * batch["x"]), "tokens": jnp.float32(2.0), "hits": jnp.float32(3.0),
                    "hits_n": jnp.float32(4.0)}

    task, params, batch = Minimal(), {"w": jnp.ones((3,))}, {"x": jnp.arange(3.0)}
    assert task.param_specs(params) == {"w": jax.sharding.PartitionSpec()}
    assert task.frozen_inputs() is None and task.activation_bytes(4, 128) == 0 and task.extra_eval(params, None) == {}
    assert isinstance(task.optimizer(loop_config()), optax.GradientTransformation)
    assert task.on_end(params, None) is None and task.meta() == {"task": "task"}
    objective, sums = task.loss(params, batch, None, None)
    assert float(objective) == 3.0 and float(sums["loss"]) == 3.0  # no "objective": the loss is differentiated
    assert set(task.eval_sums(params, batch, None)) == {"loss", "tokens", "hits", "hits_n"}
    from training.step import per_count

    assert {k: float(v) for k, v in per_count(sums).items()} == {"loss": 1.5, "hits": 0.75}  # by tokens, by hits_n

    class WithObjective(Minimal):
        def sums(self, params, batch, rng, frozen):
            return {**super().sums(params, batch, rng, frozen), "objective": jnp.sum(10 * params["w"] * batch["x"])}

    objective, sums = WithObjective().loss(params, batch, None, None)
    assert float(objective) == 30.0 and "objective" not in sums and "objective" not in WithObjective().eval_sums(
        params, batch, None)
    with pytest.raises(NotImplementedError):
        task.init_params(None)


def test_tasks_are_found_by_import_and_an_unknown_one_lists_them(tmp_path):
    found = tasks.available()
    assert {"jamba_lm", "generate", "sensebert_pretrain", "sensebert_finetune", "aux_tuning"} <= set(found)
    assert "convert" not in found and "sensebert_predict" not in found  # command lines: export neither Task nor run
    with pytest.raises(tasks.UnknownTaskError, match=r"unknown task 'nope'.*'jamba_lm'"):
        tasks.run(loop_config(task="nope"), str(tmp_path))
    with pytest.raises(tasks.UnknownTaskError, match="tasks/convert.py exports neither Task nor run"):
        tasks.run(loop_config(task="convert"), str(tmp_path))
